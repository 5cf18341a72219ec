"""The streaming session: samples in, final text out, for any chunking (MODEL.md sections 7-8).

Offline transcription is this session fed once and finished, so the two cannot drift apart.
Several recordings are one session of several streams decoded in lockstep, as one batch
(`StreamingSession.lockstep`), so that each weight read serves every stream.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from . import cpu_kernels, host, kernels
from .audio import AudioError, LogMel, check_amount, prepare_audio
from .config import AudioArgs, ConfigError
from .model import CachesSnapshot, VoxtralRealtime
from .timestamps import Alternative, Segment, Timeline, TokenRecord, Word
from .tokenizer import Tekken

# The offline right pad: after the delay, one more token and ten of margin to finish the last word.
RIGHT_PAD_EXTRA_TOKENS = 11
# Audio tokens per encoder pass: bounds activation memory for long inputs (10.24 s at 80 ms).
MAX_CHUNK_TOKENS = 128
# Tokens of audio whose encoder pass reads the ring in place on the CPU (640 ms, 4% more slots).
HOST_CHUNK_TOKENS = 8
# MLX's buffer cache is emptied each time this many more tokens are embedded (10 s of audio).
CLEAR_CACHE_TOKENS = 125
# The most positions one speculative pass may guess.
MAX_SPECULATE = 32


class SessionClosed(RuntimeError):
    """The session was finished; start a new one with `model.stream()`."""


class _Stream:
    """One stream of a session: its generated ids, their timeline, and text not yet returned."""

    def __init__(self, timeline: Timeline, on_text: Callable[[str], None] | None = None,
                 on_end: Callable[[], None] | None = None):
        self.timeline = timeline
        self.on_text = on_text
        self.on_end = on_end
        self.tokens: list[int] = []
        self.audio_samples = 0
        # In a batch, the tokens this stream needs; past them the batch decodes longer streams.
        self.limit: int | None = None
        self.ended = False
        self._new: list[str] = []

    def say(self, text: str):
        if text:
            self._new.append(text)
            if self.on_text is not None:
                self.on_text(text)

    def take(self) -> str:
        """The text that became final since the last call."""
        text, self._new = "".join(self._new), []
        return text

    def push(self, token_id: int, probability: float, alternatives: list[Alternative] | None):
        self.tokens.append(token_id)
        self.say(self.timeline.push(token_id, probability, alternatives))
        if len(self.tokens) == self.limit:
            self.end()

    def end(self):
        if not self.ended:
            self.ended = True
            self.say(self.timeline.end())
            if self.on_end is not None:
                self.on_end()


def _bind(callback: Callable | None, i: int) -> Callable | None:
    return None if callback is None else partial(callback, i)


class StreamingSession:
    """Incremental transcription of one audio stream.

    `feed` accepts float32 16 kHz mono samples in chunks of any size and returns the text
    that became final; `flush` ends an utterance (the offline right padding is fed, later
    audio continues on the same timeline); `finish` ends the stream. Use it as a context
    manager to finish on exit.

    What is final so far: `text`, the generated ids in `tokens`, one `TokenRecord` per id in
    `token_records`, and `words` and `segments` (see `timestamps`). These lists only grow,
    so `session.words[n:]` are the words that became final since there were n; the `on_*`
    callbacks are called with each item as it becomes final. Times are seconds of the audio fed:
    the padding that `flush` and `finish` feed is left out (text decoded in it is timed at the
    end of the audio before it).

    `speculate=K` (2 or more) guesses that the next tokens are `[STREAMING_PAD]` wherever audio
    embeddings are ready ahead (offline, and a stream catching up) and checks the guess in one
    decoder pass: the tokens up to the first that is not a pad are what greedy decoding gives,
    that one included; the positions after it are taken back from the cache. Tokens are those
    of plain decoding; one pass replaces one or more steps. A pass guesses 2 positions after
    text, and twice as many as the last (up to K) after a pass that was all pads, so that pad
    runs (silence) go fast and text costs little.
    """

    def __init__(self, net: VoxtralRealtime, tokenizer: Tekken, audio: AudioArgs,
                 delay_ms: int | None = None, interval_ms: float | None = None,
                 on_text: Callable[[str], None] | None = None, alternatives: int = 0,
                 pause_ms: float | None = None, on_token: Callable[[TokenRecord], None] | None = None,
                 on_word: Callable[[Word], None] | None = None,
                 on_segment: Callable[[Segment], None] | None = None, speculate: int = 0):
        self.net = net
        self.tokenizer = tokenizer
        self.audio = audio
        self.n_delay = audio.delay_tokens(delay_ms)
        self.delay_ms = round(self.n_delay * audio.token_ms)
        self.prompt = [tokenizer.bos] + [tokenizer.pad] * (audio.n_left_pad_tokens + self.n_delay)
        check_amount(interval_ms, "milliseconds", zero=True, name="interval_ms")
        self.min_tokens = max(1, round((interval_ms or 0) / audio.token_ms))
        if net.args.decoder.vocab_size > 2**24:
            raise ConfigError("a vocabulary over 2**24 ids is not supported (ids are read back as float32)")
        if isinstance(alternatives, bool) or not isinstance(alternatives, int) or alternatives < 0:
            raise ValueError(f"alternatives must be a whole number of tokens, 0 or more, not {alternatives!r}")
        self.alternatives = min(alternatives, net.args.decoder.vocab_size)
        if isinstance(speculate, bool) or not isinstance(speculate, int) or not 0 <= speculate <= MAX_SPECULATE:
            raise ValueError(f"speculate must be a whole number of positions from 0 (off) to {MAX_SPECULATE}, "
                             f"not {speculate!r}")
        self.speculate = speculate if speculate >= 2 else 0
        self.scales = net.ffn_scales(self.n_delay)
        self._mel = LogMel(audio)
        self.streams = [_Stream(Timeline(tokenizer, audio.token_ms, pause_ms, on_token=on_token, on_word=on_word,
                                         on_segment=on_segment), on_text)]
        self._start()

    @classmethod
    def lockstep(cls, net: VoxtralRealtime, tokenizer: Tekken, audio: AudioArgs, n: int,
                 delay_ms: int | None = None, alternatives: int = 0, pause_ms: float | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 on_token: Callable[[int, TokenRecord], None] | None = None,
                 on_end: Callable[[int], None] | None = None, speculate: int = 0) -> "StreamingSession":
        """A session of n streams decoded as one batch, for `finish_batch`.

        The callbacks get the stream's index first: `on_text(i, text)`, `on_token(i, record)`,
        and `on_end(i)` as soon as stream i has all its tokens; `streams[i]` holds them.
        `speculate` applies to a session of one stream only.
        """
        session = cls(net, tokenizer, audio, delay_ms=delay_ms, alternatives=alternatives, pause_ms=pause_ms,
                      speculate=speculate)
        session.streams = [_Stream(Timeline(tokenizer, audio.token_ms, pause_ms, on_token=_bind(on_token, i)),
                                   _bind(on_text, i), _bind(on_end, i)) for i in range(n)]
        session._start()
        return session

    def _start(self):
        """Empty state with one batch row per stream."""
        spt, half = self.audio.samples_per_token, self.audio.window_size // 2
        B = len(self.streams)
        self.speculate = self.speculate if B == 1 else 0  # streams of a batch would take back different counts
        # Spare encoder slots let the Metal kernels read the encoder ring in place for a whole chunk,
        # and the CPU's (`host`) for chunks of up to HOST_CHUNK_TOKENS.
        encoder_spare = self.net.args.downsample_factor * MAX_CHUNK_TOKENS - 1 if kernels.enabled() else 0
        if not encoder_spare and host.fits(self.net.encoder.transformer.layers, []):
            encoder_spare = self.net.args.downsample_factor * HOST_CHUNK_TOKENS - 1
        self._spares = dict(spare=max(self.speculate - 1, 0), encoder_spare=encoder_spare)
        self.caches = self.net.make_cache(B, **self._spares)
        # The streams in the batch, by index, in the order of its rows; finished ones leave.
        self._rows = list(range(B))
        # Samples of the padded timeline from `_buf_start` on, one row per stream; the left pad
        # and its reflection are zeros.
        self._buf = np.zeros((B, half + self.audio.n_left_pad_tokens * spt), np.float32)
        self._buf_start = -half
        self._received = self.audio.n_left_pad_tokens * spt
        self._audio_samples = 0
        self._since_flush = 0
        self._n_embedded = 0
        self._n_decoded = 0
        self._last: mx.array | None = None
        self._guess = 2  # positions of the next speculative pass
        self._unread: tuple[mx.array, list[int]] | None = None
        self._closed = False

    def prepare(self) -> None:
        """Compute now, where the model has not yet, what this session's first audio would wait
        for: the state of the tokens that hear only the left pad, which the model keeps for every
        later session at this delay and on this compute path, and on disk for later processes
        (`Voxtral.prepare`; 3-5 s for the 4B model on a 2-core CPU, once; `states`)."""
        self._left_pad_state()

    def _left_pad_state(self) -> CachesSnapshot | None:
        """The model's state after the tokens that hear only the left pad (zeros; 31 of the 32),
        computed on first use per delay and compute path (or read from the model's store of
        states on disk); None where there are none."""
        spt, half, n = self.audio.samples_per_token, self.audio.window_size // 2, self.audio.pad_only_tokens
        if n < 1:
            return None
        key = (self.n_delay, str(mx.default_device()), self.net.dtype, kernels.enabled(), cpu_kernels.row_kernel(),
               host.fits(self.net.encoder.transformer.layers, []), host.fits(self.net.layers, []))
        snapshot = self.net.snapshots.get(key)
        if snapshot is None:
            caches = self.net.make_cache(1, **self._spares)
            mel = self._mel(mx.zeros((1, half + n * spt + self.audio.look_ahead)))
            self.net.decode(self.net.encode(mel, caches), mx.array([self.prompt[:n]]), caches, self.scales)
            snapshot = caches.snapshot()
            self.net.snapshots.put(key, snapshot)
        return snapshot

    def _skip_left_pad(self):
        """Go past the tokens that hear only the left pad: their state is the same for every
        stream, so it is computed once per model, delay and compute path, and copied into each
        new session's caches (a 5 s clip's encoder and prompt: 28% and 79% of their work). Done
        on the first audio, once `expect` has sized the rings."""
        snapshot = self._left_pad_state()
        if snapshot is None:
            return
        self.caches.restore(snapshot, len(self.streams))
        self._embedded(self.audio.pad_only_tokens)
        self._n_decoded = self.audio.pad_only_tokens

    def __enter__(self) -> "StreamingSession":
        return self

    def __exit__(self, *exc) -> None:
        if not self._closed:
            self._finish()  # its text waits for a `finish()` after the block

    @property
    def finished(self) -> bool:
        return self._closed

    @property
    def audio_seconds(self) -> float:
        """Seconds of input audio fed so far (padding excluded)."""
        return self.streams[0].audio_samples / self.audio.sampling_rate

    @property
    def timeline(self) -> Timeline:
        return self.streams[0].timeline

    @property
    def tokens(self) -> list[int]:
        return self.streams[0].tokens

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
        self._check_one_stream()
        self._advance(self._begin("feed", prepare_audio(samples, name="samples")))
        return self.streams[0].take()

    def flush(self) -> str:
        """End the current utterance: feed the offline right padding and decode through it."""
        self._check_open()
        self._check_one_stream()
        if self._since_flush == 0:
            return ""
        self._advance(self._begin("flush"))
        self._complete("flush")
        return self.streams[0].take()

    def _begin(self, kind: str, samples: np.ndarray | None = None) -> bool | None:
        """What `feed` (of `samples`), `flush` or `finish` adds before decoding: the audio, or
        the padding. Returns `force` for `_ready`, or None where there is nothing to decode (a
        flush with nothing new, the end of a session that had no audio)."""
        if kind == "feed":
            self.streams[0].audio_samples += samples.size
            self._audio_samples += samples.size
            self._since_flush += samples.size
            self._append(samples)
            return False
        if kind == "flush":
            if not self._since_flush:
                return None
            self._append_padding()
            return True
        return True if self._pad_end() else None

    def _complete(self, kind: str):
        """What a flush or finish does after its decoding: the utterance closed, or the session."""
        if kind == "flush":
            self.timeline.close()
        elif kind == "finish":
            self._end()

    def finish(self) -> str:
        """End the stream: pad as offline, decode everything, return the remaining text. On a
        finished session (a second call, or after the `with` block that finished it), the text
        not yet returned, then ""."""
        if not self._closed:
            self._finish()
        return self.streams[0].take()

    def _finish(self):
        if (force := self._begin("finish")) is not None:
            self._advance(force)
        self._complete("finish")

    def _pad_end(self) -> bool:
        """The end's padding, where there was audio (whether there is anything to decode)."""
        if not self._audio_samples:
            return False
        if self._since_flush:
            self._append_padding(final=True)
        else:  # after a flush: its padding's last tokens are the end
            self._skip(None)
        # The STFT reflects the final padding zeros: the last token sees zeros beyond the end.
        self._append(np.zeros(self.audio.look_ahead, np.float32), count=False)
        return True

    def _end(self):
        for stream in self.streams:
            stream.end()
        self._closed = True
        mx.clear_cache()

    def finish_batch(self, samples: list[np.ndarray]):
        """Decode one recording per stream of a `lockstep` session, as one batch, and finish.

        The streams share one timeline: each recording is padded with zeros to the longest.
        The model is causal, so a stream's tokens up to the end of its own offline padding are
        those of a session of its own; it takes just those and leaves the batch.
        """
        self._check_open()
        if len(samples) != len(self.streams) or self._audio_samples:
            raise ValueError(f"finish_batch takes one recording per stream ({len(self.streams)}) of a new session")
        samples = [prepare_audio(x, name=f"samples[{i}]") for i, x in enumerate(samples)]
        padded = np.zeros((len(samples), max(x.size for x in samples)), np.float32)
        for i, (stream, x) in enumerate(zip(self.streams, samples)):
            if x.size == 0:
                raise AudioError(f"samples[{i}]: contains no samples")
            padded[i, : x.size] = x
            stream.audio_samples = x.size
            stream.timeline.skip(x.size / self.audio.sampling_rate, math.inf)  # its zeros are padding
            stream.limit = self._positions(x.size) - len(self.prompt) + 1
        self.expect(padded.shape[1])
        self._audio_samples = self._since_flush = padded.shape[1]
        self._append(padded)
        self._advance(force=False)  # as `feed` would: one stream decodes exactly as feed + finish
        self.finish()

    def _positions(self, samples: int) -> int:
        """Decoder positions of a recording of `samples` samples decoded offline, as its own
        session decodes it: the left pad, its audio to a whole token, and n_delay + 11 tokens."""
        spt = self.audio.samples_per_token
        return self.audio.n_left_pad_tokens + -(-samples // spt) + self.n_delay + RIGHT_PAD_EXTRA_TOKENS

    def expect(self, samples: int):
        """Size the caches for recordings of at most `samples` samples, each fed and finished
        as one (offline): each ring is then allocated once rather than grown 256 positions at a
        time, each step copying what it holds."""
        self.caches.expect(self._positions(samples), self.net.args.downsample_factor)

    def _check_open(self):
        if self._closed:
            raise SessionClosed("this streaming session is finished; start a new one with model.stream()")

    def _check_one_stream(self):
        if len(self.streams) > 1:
            raise ValueError("a session of several streams is fed by finish_batch()")

    def _append(self, samples: np.ndarray, count: bool = True):
        """Add samples to the timeline: [B, n], one row per stream in the batch, or [n] for all."""
        samples = np.broadcast_to(samples, (self._buf.shape[0], samples.shape[-1]))
        self._buf = np.concatenate([self._buf, samples], axis=1)
        if count:
            self._received += samples.shape[1]

    def _append_padding(self, final: bool = False):
        """The offline right padding, left out of the streams' times (all after it, if `final`)."""
        spt = self.audio.samples_per_token
        n = -self._received % spt + (self.n_delay + RIGHT_PAD_EXTRA_TOKENS) * spt
        self._skip(None if final else n)
        self._append(np.zeros(n, np.float32))
        self._since_flush = 0

    def _skip(self, samples: int | None):
        """The streams' next `samples` samples (None: all) are padding, not audio."""
        sr = self.audio.sampling_rate
        at = (self._received - self.audio.n_left_pad_tokens * self.audio.samples_per_token) / sr  # on the token grid
        for stream in self.streams:
            stream.timeline.skip(at, math.inf if samples is None else samples / sr)

    def _advance(self, force: bool):
        todo = self._ready(force)
        before = self._n_embedded
        while todo and self._rows:
            k = min(todo, MAX_CHUNK_TOKENS)
            todo -= k
            emb = self._encode(k)
            self._steps(emb, self._prompt_positions(emb))
        self._settle(before)

    def _ready(self, force: bool) -> int:
        """How many tokens to embed and decode now: all whose audio is in, if there are at least
        `min_tokens` of them (one, with `force`), else 0."""
        if self._n_embedded == 0:
            self._skip_left_pad()
        spt = self.audio.samples_per_token
        # Token t needs samples up to (t + 1) * spt + look_ahead of the padded stream.
        n = (self._buf_start + self._buf.shape[1] - self.audio.look_ahead) // spt - self._n_embedded
        return n if n >= (1 if force else self.min_tokens) else 0

    def _settle(self, before: int):
        """After decoding from `before` embedded tokens on: the last token read, and MLX's
        buffer cache cleared every CLEAR_CACHE_TOKENS."""
        if self._unread is not None:
            self._read(*self._unread)
            self._unread = None
        if self._n_embedded // CLEAR_CACHE_TOKENS > before // CLEAR_CACHE_TOKENS:
            # The rings are written in place; what MLX keeps in its buffer cache is the
            # activations of past chunks, which a long stream need not hold on to.
            mx.clear_cache()

    def _encode(self, k: int) -> mx.array:
        spt, half = self.audio.samples_per_token, self.audio.window_size // 2
        t0 = self._n_embedded
        lo = t0 * spt - half - self._buf_start
        hi = (t0 + k) * spt + self.audio.look_ahead - self._buf_start
        mel = self._mel(mx.array(self._buf[:, lo:hi]))  # [B, 8k, n_mels]
        emb = self.net.encode(mel, self.caches)  # [B, k, dim]
        mx.eval(emb, [c.state for c in self.caches.encoder], self.caches.stem.tails)
        self._embedded(k)
        return emb

    def _embedded(self, k: int):
        """k more tokens are embedded: the samples that no later token reads leave the buffer."""
        keep = (self._n_embedded + k) * self.audio.samples_per_token - self.audio.window_size // 2
        self._buf = self._buf[:, keep - self._buf_start :]
        self._buf_start = keep
        self._n_embedded += k

    def _prompt_positions(self, emb: mx.array) -> int:
        """Run the prompt's positions among those of new audio embeddings [B, k, dim]; returns how many."""
        L = len(self.prompt)
        if self._n_decoded >= L:
            return 0
        B, k, _ = emb.shape
        first = min(k, L - self._n_decoded)
        prompt = mx.array(self.prompt[self._n_decoded : self._n_decoded + first])
        logits = self.net.decode(emb[:, :first], mx.broadcast_to(prompt, (B, first)), self.caches, self.scales)
        self._n_decoded += first
        if self._n_decoded == L:
            self._queue(logits)
        else:
            mx.eval([c.state for c in self.caches.decoder])
        return first

    def _steps(self, emb: mx.array, p: int):
        """Run the decoder positions of new audio embeddings [B, k, dim] from p on, each a step
        that feeds back the token before; one host sync per step (per pass when speculating)."""
        k = emb.shape[1]
        while p < k:
            if self.speculate and k - p >= 2:
                p += self._speculate(emb[:, p : p + self._guess])
                continue
            emb = self._leave_batch(emb)
            if not self._rows:
                return
            logits = self.net.decode(emb[:, p : p + 1], self._last[:, None], self.caches, self.scales)
            self._n_decoded += 1
            self._queue(logits)
            p += 1

    def _speculate(self, emb: mx.array) -> int:
        """One pass over n positions guessing that the tokens fed back are pads; returns how
        many positions are kept (one to n). One stream only."""
        n = emb.shape[1]
        tokens = mx.concatenate([self._last[:, None], mx.full((1, n - 1), self.tokenizer.pad, mx.uint32)], axis=1)
        logits = self.net.decode(emb, tokens, self.caches, self.scales, every=True)[0]
        step = self._step_values(logits, mx.argmax(logits, axis=-1))  # [n, 2 + 2K]
        mx.async_eval(step)
        if self._unread is not None:
            self._read(*self._unread)
            self._unread = None
        values = step.tolist()
        # Position i's input is right if every token before it is the pad that was guessed.
        kept = next((i + 1 for i, v in enumerate(values) if int(v[0]) != self.tokenizer.pad), n)
        for v in values[:kept]:
            self._read_values(0, v)
        for cache in self.caches.decoder:
            cache.rollback(n - kept)
        self._guess = min(2 * self._guess, self.speculate) if kept == n else 2
        self._n_decoded += kept
        self._last = mx.array([int(values[kept - 1][0])], mx.uint32)
        return kept

    def _leave_batch(self, emb: mx.array) -> mx.array:
        """Streams that have all their tokens leave the batch: their rows of every state go."""
        generated = self._n_decoded - len(self.prompt) + 1
        keep = [i for i, s in enumerate(self._rows) if self.streams[s].limit is None
                or self.streams[s].limit > generated]
        if len(keep) == len(self._rows) or not keep:
            self._rows = [self._rows[i] for i in keep]
            return emb
        rows = mx.array(keep)
        self.caches.filter(rows)
        self._buf = self._buf[keep]
        self._last = self._last[rows]
        self._rows = [self._rows[i] for i in keep]
        return emb[rows]

    def _queue(self, logits: mx.array):
        """Start computing the next tokens and their records, then read the previous ones while these run."""
        token = mx.argmax(logits, axis=-1)  # [B]
        step = self._step_values(logits, token)
        mx.async_eval(token, step)
        self._last = token
        previous, self._unread = self._unread, (step, self._rows)
        if previous is not None:
            self._read(*previous)

    def _step_values(self, logits: mx.array, token: mx.array) -> mx.array:
        """What the host reads per step, in one array: per row [id, p(id), K alternative ids, their p].

        float32 holds ids below 2**24 exactly, so one read returns ids and probabilities.
        """
        logits = logits.astype(mx.float32)  # [B, vocab]
        log_z = mx.logsumexp(logits, axis=-1, keepdims=True)
        token = token[:, None]
        values = [token.astype(mx.float32), mx.exp(mx.take_along_axis(logits, token, axis=-1) - log_z)]
        if self.alternatives:
            top = mx.argpartition(-logits, self.alternatives - 1, axis=-1)[:, : self.alternatives]
            top = mx.take_along_axis(top, mx.argsort(-mx.take_along_axis(logits, top, axis=-1), axis=-1), axis=-1)
            values += [top.astype(mx.float32), mx.exp(mx.take_along_axis(logits, top, axis=-1) - log_z)]
        return mx.concatenate(values, axis=-1)  # [B, 2 + 2K]

    def _read(self, step: mx.array, rows: list[int]):
        for s, values in zip(rows, step.tolist()):
            self._read_values(s, values)

    def _read_values(self, s: int, values: list[float]):
        """Give stream s its token from one row of `_step_values`."""
        k = self.alternatives
        alternatives = None
        if k:
            alternatives = [Alternative(int(i), self.tokenizer.token_str(int(i)), p)
                            for i, p in zip(values[2 : 2 + k], values[2 + k :])]
        self.streams[s].push(int(values[0]), values[1], alternatives)


def feed_together(sessions: Sequence[StreamingSession], chunks: Sequence) -> list[str]:
    """Feed each session its chunk of samples, as `feed` does, decoding the sessions' steps
    together: one decoder pass takes a position of every session that has one to decode, so
    each weight read serves all of them (`VoxtralRealtime.decode_rows`); the sessions may be at
    positions and delays of their own. Each session's tokens and records are those its own
    `feed` gives (exactly where voxtral-mlx's CPU kernels multiply; on a GPU, a near-tie
    between two tokens can go the other way). A session with positions left when the others
    have none decodes them alone (speculating where it does). Returns each session's new text.
    """
    if len(chunks) != len(sessions):
        raise ValueError(f"feed_together takes one chunk per session, got {len(chunks)} for {len(sessions)}")
    return advance_together(sessions, [("feed", x) for x in chunks])


def advance_together(sessions: Sequence[StreamingSession], ops: Sequence[tuple]) -> list[str]:
    """`feed_together` of one operation per session: ("feed", samples), ("flush",) or
    ("finish",), each as the session's own method does it (a flush with nothing new to flush,
    and a finish of a finished session, decode nothing), their decoder steps together. Returns
    each session's new text."""
    sessions = list(sessions)
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("feed_together takes each session once")
    if any(s.net is not sessions[0].net for s in sessions):
        raise ValueError("feed_together takes sessions of one model")
    if any(op[0] not in ("feed", "flush", "finish") for op in ops) or len(ops) != len(sessions):
        raise ValueError("advance_together takes one operation per session: feed, flush or finish")
    chunks = {}
    for i, (s, op) in enumerate(zip(sessions, ops)):
        if op[0] == "finish" and s.finished:
            continue
        s._check_open()
        s._check_one_stream()
        if op[0] == "feed":
            chunks[i] = prepare_audio(op[1], name=f"chunks[{i}]")
    # Nothing is changed before every session and chunk is checked. Then each session's
    # operation up to its decoding, and what comes after it.
    todo, after = [], []  # tokens to decode; "flush" or "finish" to complete after
    for i, (s, (kind, *_)) in enumerate(zip(sessions, ops)):
        force = None if kind == "finish" and s.finished else s._begin(kind, chunks.get(i))
        todo.append(0 if force is None else s._ready(force))
        # (a flush with nothing new to flush does nothing; a session's end, audio or not, ends it)
        after.append(kind if kind == "finish" and not s.finished or kind == "flush" and force else None)
    before = [s._n_embedded for s in sessions]
    while True:
        work = []  # [session, embeddings, next position]
        for i, s in enumerate(sessions):
            if todo[i] and s._rows:
                k = min(todo[i], MAX_CHUNK_TOKENS)
                todo[i] -= k
                emb = s._encode(k)
                work.append([s, emb, s._prompt_positions(emb)])
        if not work:
            break
        while len(active := [w for w in work if w[2] < w[1].shape[1]]) > 1:
            audio = mx.concatenate([emb[0, p : p + 1] for _, emb, p in active])  # [n, dim]
            logits = active[0][0].net.decode_rows(audio, mx.concatenate([s._last for s, _, _ in active]),
                                                  [s.caches for s, _, _ in active], [s.scales for s, _, _ in active])
            for i, w in enumerate(active):
                w[0]._n_decoded += 1
                w[0]._queue(logits[i : i + 1])
                w[2] += 1
        for s, emb, p in active:
            s._steps(emb, p)
    for s, n, kind in zip(sessions, before, after):
        s._settle(n)
        s._complete(kind)
    return [s.streams[0].take() for s in sessions]
