"""The streaming session: samples in, final text out, for any chunking (MODEL.md sections 7-8).

Offline transcription is this session fed once and finished, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from .audio import LogMel, prepare_audio
from .config import AudioArgs, ConfigError
from .model import VoxtralRealtime
from .timestamps import Alternative, Segment, Timeline, TokenRecord, Word
from .tokenizer import Tekken

# The offline right pad: after the delay, one more token and ten of margin to finish the last word.
RIGHT_PAD_EXTRA_TOKENS = 11
# Audio tokens per encoder pass: bounds activation memory for long inputs (10.24 s at 80 ms).
MAX_CHUNK_TOKENS = 128


class SessionClosed(RuntimeError):
    """The session was finished; start a new one with `model.stream()`."""


class StreamingSession:
    """Incremental transcription of one audio stream.

    `feed` accepts float32 16 kHz mono samples in chunks of any size and returns the text
    that became final; `flush` ends an utterance (the offline right padding is fed, later
    audio continues on the same timeline); `finish` ends the stream. Use it as a context
    manager to finish on exit.

    What is final so far: `text`, the generated ids in `tokens`, one `TokenRecord` per id in
    `token_records`, and `words` and `segments` (see `timestamps`). These lists only grow,
    so `session.words[n:]` are the words that became final since there were n; the `on_*`
    callbacks are called with each item as it becomes final. Times are seconds on the
    stream's timeline, which includes the padding that `flush` inserts.
    """

    def __init__(self, net: VoxtralRealtime, tokenizer: Tekken, audio: AudioArgs,
                 delay_ms: int | None = None, interval_ms: float | None = None,
                 on_text: Callable[[str], None] | None = None, alternatives: int = 0,
                 pause_ms: float | None = None, on_token: Callable[[TokenRecord], None] | None = None,
                 on_word: Callable[[Word], None] | None = None,
                 on_segment: Callable[[Segment], None] | None = None):
        self.net = net
        self.tokenizer = tokenizer
        self.audio = audio
        self.n_delay = audio.delay_tokens(delay_ms)
        self.delay_ms = round(self.n_delay * audio.token_ms)
        self.prompt = [tokenizer.bos] + [tokenizer.pad] * (audio.n_left_pad_tokens + self.n_delay)
        self.min_tokens = max(1, round((interval_ms or 0) / audio.token_ms))
        self.on_text = on_text
        if net.args.decoder.vocab_size > 2**24:
            raise ConfigError("a vocabulary over 2**24 ids is not supported (ids are read back as float32)")
        if isinstance(alternatives, bool) or not isinstance(alternatives, int) or alternatives < 0:
            raise ValueError(f"alternatives must be a whole number of tokens, 0 or more, not {alternatives!r}")
        self.alternatives = min(alternatives, net.args.decoder.vocab_size)
        self.tokens: list[int] = []
        self.timeline = Timeline(tokenizer, audio.token_ms, pause_ms, on_token=on_token, on_word=on_word,
                                 on_segment=on_segment)
        self.caches = net.make_cache()
        self.scales = net.ffn_scales(self.n_delay)
        self._mel = LogMel(audio)
        spt, half = audio.samples_per_token, audio.window_size // 2
        # Samples of the padded stream from `_buf_start` on; the left pad and its reflection are zeros.
        self._buf = np.zeros(half + audio.n_left_pad_tokens * spt, np.float32)
        self._buf_start = -half
        self._received = audio.n_left_pad_tokens * spt
        self._audio_samples = 0
        self._since_flush = 0
        self._n_embedded = 0
        self._n_decoded = 0
        self._last: mx.array | None = None
        self._unread: mx.array | None = None
        self._closed = False

    def __enter__(self) -> "StreamingSession":
        return self

    def __exit__(self, *exc) -> None:
        if not self._closed:
            self.finish()

    @property
    def finished(self) -> bool:
        return self._closed

    @property
    def audio_seconds(self) -> float:
        """Seconds of input audio fed so far (padding excluded)."""
        return self._audio_samples / self.audio.sampling_rate

    @property
    def text(self) -> str:
        return self.timeline.text

    @property
    def token_records(self) -> list[TokenRecord]:
        return self.timeline.records

    @property
    def words(self) -> list[Word]:
        return self.timeline.words

    @property
    def segments(self) -> list[Segment]:
        return self.timeline.segments

    def feed(self, samples) -> str:
        """Add samples (float32, 16 kHz, mono, any length); return the text that became final."""
        self._check_open()
        samples = prepare_audio(samples, name="samples")
        self._audio_samples += samples.size
        self._since_flush += samples.size
        self._append(samples)
        return self._advance(force=False)

    def flush(self) -> str:
        """End the current utterance: feed the offline right padding and decode through it."""
        self._check_open()
        if self._since_flush == 0:
            return ""
        self._append_padding()
        text = self._advance(force=True)
        self.timeline.close()
        return text

    def finish(self) -> str:
        """End the stream: pad as offline, decode everything, return the remaining text."""
        self._check_open()
        text = ""
        if self._audio_samples:
            if self._since_flush:
                self._append_padding()
            # The STFT reflects the final padding zeros: the last token sees zeros beyond the end.
            self._append(np.zeros(self.audio.look_ahead, np.float32), count=False)
            text = self._advance(force=True)
        text += self._say(self.timeline.end())
        self._closed = True
        return text

    def _check_open(self):
        if self._closed:
            raise SessionClosed("this streaming session is finished; start a new one with model.stream()")

    def _append(self, samples: np.ndarray, count: bool = True):
        self._buf = np.concatenate([self._buf, samples]) if self._buf.size else samples.copy()
        if count:
            self._received += samples.size

    def _append_padding(self):
        spt = self.audio.samples_per_token
        to_boundary = -self._received % spt
        self._append(np.zeros(to_boundary + (self.n_delay + RIGHT_PAD_EXTRA_TOKENS) * spt, np.float32))
        self._since_flush = 0

    def _advance(self, force: bool) -> str:
        spt = self.audio.samples_per_token
        # Token t needs samples up to (t + 1) * spt + look_ahead of the padded stream.
        ready = (self._buf_start + self._buf.size - self.audio.look_ahead) // spt
        if ready - self._n_embedded < (1 if force else self.min_tokens):
            return ""
        text = ""
        while self._n_embedded < ready:
            k = min(ready - self._n_embedded, MAX_CHUNK_TOKENS)
            text += self._decode(self._encode(k))
        if self._unread is not None:
            text += self._read(self._unread)
            self._unread = None
        return text

    def _encode(self, k: int) -> mx.array:
        spt, half = self.audio.samples_per_token, self.audio.window_size // 2
        t0 = self._n_embedded
        lo = t0 * spt - half - self._buf_start
        hi = (t0 + k) * spt + self.audio.look_ahead - self._buf_start
        mel = self._mel(mx.array(self._buf[lo:hi]))  # [8k, n_mels]
        emb = self.net.encode(mel, self.caches)  # [k, dim]
        mx.eval(emb, [c.state for c in self.caches.encoder], self.caches.stem.tails)
        keep = (t0 + k) * spt - half
        self._buf = self._buf[keep - self._buf_start :]
        self._buf_start = keep
        self._n_embedded += k
        return emb

    def _decode(self, emb: mx.array) -> str:
        """Run decoder positions for new audio embeddings; one host sync per generated token."""
        text, row, L = "", 0, len(self.prompt)
        if self._n_decoded < L:
            row = min(emb.shape[0], L - self._n_decoded)
            prompt = mx.array(self.prompt[self._n_decoded : self._n_decoded + row])
            logits = self.net.decode(emb[:row], prompt, self.caches, self.scales)
            self._n_decoded += row
            if self._n_decoded == L:
                text += self._queue(logits)
            else:
                mx.eval([c.state for c in self.caches.decoder])
        for r in range(row, emb.shape[0]):
            logits = self.net.decode(emb[r : r + 1], self._last.reshape(1), self.caches, self.scales)
            self._n_decoded += 1
            text += self._queue(logits)
        return text

    def _queue(self, logits: mx.array) -> str:
        """Start computing the next token and its record, then read the previous one while this one runs."""
        token = mx.argmax(logits)
        step = self._step_values(logits, token)
        mx.async_eval(token, step)
        self._last = token
        previous, self._unread = self._unread, step
        return "" if previous is None else self._read(previous)

    def _step_values(self, logits: mx.array, token: mx.array) -> mx.array:
        """What the host reads per step, in one array: [id, p(id), K alternative ids, their p].

        float32 holds ids below 2**24 exactly, so one read returns ids and probabilities.
        """
        logits = logits.astype(mx.float32)
        log_z = mx.logsumexp(logits)
        values = [token.astype(mx.float32)[None], mx.exp(logits[token] - log_z)[None]]
        if self.alternatives:
            top = mx.argpartition(-logits, self.alternatives - 1)[: self.alternatives]
            top = top[mx.argsort(-logits[top])]
            values += [top.astype(mx.float32), mx.exp(logits[top] - log_z)]
        return mx.concatenate(values)

    def _read(self, step: mx.array) -> str:
        values = step.tolist()
        tid = int(values[0])
        self.tokens.append(tid)
        alternatives = None
        if self.alternatives:
            k = self.alternatives
            alternatives = [Alternative(int(i), self.tokenizer.token_str(int(i)), p)
                            for i, p in zip(values[2 : 2 + k], values[2 + k :])]
        return self._say(self.timeline.push(tid, values[1], alternatives))

    def _say(self, text: str) -> str:
        if text and self.on_text is not None:
            self.on_text(text)
        return text
