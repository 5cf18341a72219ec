"""The user-facing model: transcribe audio offline or open a streaming session; results and writers."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import mlx.core as mx
import numpy as np

from . import cpu_kernels, cpu_quant, host, mkl_bf16
from .audio import SAMPLE_RATE, AudioError, load_audio, prepare_audio
from .config import AudioArgs
from .model import VoxtralRealtime
from .streaming import StreamingSession
from .timestamps import Alternative, Segment, TokenRecord, Word
from .tokenizer import Tekken

# Positions per speculative pass of `transcribe` by default where a pass costs about one step
# and gives each position a step's own numbers (`Voxtral.default_speculate`).
SPECULATE = 8


@dataclass
class Transcription:
    """The result of `Voxtral.transcribe`.

    Attributes:
        text: the transcript.
        tokens: every generated id after the prompt, control tokens included, one per 80 ms.
        delay_ms: the transcription delay used.
        duration: seconds of input audio.
        segments: sentences or stretches of speech between pauses, with their words.
        token_records: one `TokenRecord` (id, text, time, probability, alternatives) per token.
        words: (property) the words of all segments, in order.

    Times are seconds; `timestamps` has the rules that make words and segments.
    """

    text: str
    tokens: list[int]
    delay_ms: int
    duration: float
    segments: list[Segment] = field(default_factory=list)
    token_records: list[TokenRecord] = field(default_factory=list)

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]

    @classmethod
    def from_session(cls, session: StreamingSession, stream: int = 0) -> "Transcription":
        """The result so far of a streaming session (all of it once finished); `stream` picks one of a batch."""
        s = session.streams[stream]
        return cls(text=s.timeline.text, tokens=list(s.tokens), delay_ms=session.delay_ms,
                   duration=s.audio_samples / session.audio.sampling_rate, segments=list(s.timeline.segments),
                   token_records=list(s.timeline.records))

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data; words use whisper's keys (`word`, `start`, `end`, `probability`)."""
        return {
            "text": self.text,
            "duration": self.duration,
            "delay_ms": self.delay_ms,
            "segments": [
                {"id": i, "start": s.start, "end": s.end, "text": s.text,
                 "words": [{"word": w.text, "start": w.start, "end": w.end, "probability": w.probability}
                           for w in s.words]}
                for i, s in enumerate(self.segments)
            ],
            "tokens": [_token_dict(r) for r in self.token_records],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Transcription":
        """The inverse of `to_dict` (reads a JSON file written by `write_outputs`)."""
        records = [
            TokenRecord(t["id"], t["text"], t["time"], t["probability"],
                        None if "alternatives" not in t else [Alternative(**a) for a in t["alternatives"]])
            for t in data["tokens"]
        ]
        segments = [
            Segment(s["start"], s["end"], s["text"],
                    [Word(w["start"], w["end"], w["word"], w["probability"]) for w in s["words"]])
            for s in data["segments"]
        ]
        return cls(text=data["text"], tokens=[r.id for r in records], delay_ms=data["delay_ms"],
                   duration=data["duration"], segments=segments, token_records=records)


def _token_dict(r: TokenRecord) -> dict[str, Any]:
    d = {"id": r.id, "text": r.text, "time": r.time, "probability": r.probability}
    if r.alternatives is not None:
        d["alternatives"] = [{"id": a.id, "text": a.text, "probability": a.probability} for a in r.alternatives]
    return d


class Voxtral:
    """Voxtral Realtime, loaded by `voxtral_mlx.load`."""

    def __init__(self, net: VoxtralRealtime, tokenizer: Tekken, audio: AudioArgs, path: Path):
        self.net = net
        self.tokenizer = tokenizer
        self.audio = audio
        self.path = path

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype activations are computed in: float32 wherever voxtral-mlx's CPU kernels
        multiply (`load(dtype="bfloat16")` there rounds the products' inputs to bfloat16, and
        quantized weights multiply exactly, with float32 around them)."""
        return self.net.dtype

    @property
    def sample_rate(self) -> int:
        return self.audio.sampling_rate

    @property
    def default_speculate(self) -> int:
        """`transcribe`'s `speculate` when not given: 8 where a decoder pass of 8 positions runs
        on the CPU's row kernels, which give each position the bits of its own step at about
        a step's cost (the 4B model's products on x86-64 with AMX, or quantized with AVX-512:
        speech 1.47x and silence 2.1x faster there; over bfloat16 weights on a Zen 4 without
        AMX, 1.54x and 2.3-2.4x, at 8 and 4 bits there (AVX-512 VNNI) 1.41x and 1.94x, 1.18x and
        1.47x); else 0, off."""
        return SPECULATE if host.rows_exact(self.net, SPECULATE) else 0

    def stream(self, delay_ms: int | None = None, interval_ms: float | None = None,
               on_text: Callable[[str], None] | None = None, alternatives: int = 0,
               pause_ms: float | None = None, on_token: Callable[[TokenRecord], None] | None = None,
               on_word: Callable[[Word], None] | None = None,
               on_segment: Callable[[Segment], None] | None = None, speculate: int = 0) -> StreamingSession:
        """Open a streaming session.

        Args:
            delay_ms: transcription delay, 80..1200 in steps of 80, or 2400; default from tekken.json.
            interval_ms: run the model only once this much new audio is ready (default: every token).
            on_text: called with each piece of text as soon as it is final.
            alternatives: also record this many most probable tokens per step (default 0: none).
            pause_ms: a segment ends after more than this much time without text (default 1000).
            on_token, on_word, on_segment: called with each token record, word and segment as
                soon as it is final.
            speculate: check this many positions per decoder pass, guessing pads where audio is
                already there (2..32; 0: off). The tokens are the same; see `StreamingSession`.
        """
        return StreamingSession(self.net, self.tokenizer, self.audio, delay_ms=delay_ms,
                                interval_ms=interval_ms, on_text=on_text, alternatives=alternatives,
                                pause_ms=pause_ms, on_token=on_token, on_word=on_word,
                                on_segment=on_segment, speculate=speculate)

    def prepare(self, delay_ms: int | None = None) -> None:
        """Compute now what this model's first session at `delay_ms` would compute on its first
        audio: the state of the tokens that hear only the left pad, the same for every recording,
        which every later session copies (3-5 s for the 4B model on a 2-core CPU, once; later
        processes read it from disk, see `states`). Live captions (`mic`, the server) call it
        before they listen, so that their first words are not late by it."""
        self.stream(delay_ms=delay_ms).prepare()

    def transcribe(self, audio: str | os.PathLike | np.ndarray | Sequence[str | os.PathLike | np.ndarray],
                   delay_ms: int | None = None, sample_rate: int = SAMPLE_RATE,
                   on_text: Callable[..., None] | None = None, alternatives: int = 0,
                   pause_ms: float | None = None, on_token: Callable[..., None] | None = None,
                   batch_size: int = 4, on_result: Callable[[int, Transcription], None] | None = None,
                   speculate: int | None = None) -> Transcription | list[Transcription]:
        """Transcribe a whole recording, or a list of them.

        A list is decoded `batch_size` recordings at a time, in its order, each batch as one:
        every decoder step reads the weights once for all of its recordings. The result is a
        list in the same order, each what the recording gives alone: exactly on the CPU; on a
        GPU a near-tie between two tokens can go the other way.

        Args:
            audio: a file path, or mono samples (float in [-1, 1] or integer PCM); or a list
                (or tuple) of them.
            delay_ms: transcription delay, 80..1200 in steps of 80, or 2400; default from tekken.json.
            sample_rate: the rate of array audio (resampled to 16 kHz); ignored for files.
            on_text: called with each piece of text as soon as it is decoded; for a list, as
                `on_text(i, text)`, `i` the recording's index.
            alternatives: also record this many most probable tokens per step (default 0: none).
            pause_ms: a segment ends after more than this much time without text (default 1000).
            on_token: called with each token record as it is decoded (progress, for instance);
                for a list, as `on_token(i, record)`.
            batch_size: for a list, the most recordings decoded together (default 4). More is
                faster, up to the machine's compute, and takes a decoder cache per recording.
                On a CPU whose products go through voxtral-mlx's kernels, at most 32.
            on_result: for a list, called as `on_result(i, transcription)` as soon as recording
                `i` is done (in a batch the shorter ones finish first).
            speculate: check this many positions per decoder pass, guessing pads (2..32; 0:
                off); the tokens are the same. It applies to one recording at a time (a batch
                of one), not to batches of several, which take the weights once per step already.
                Default: `default_speculate` (8 where the CPU's row kernels multiply, else off).
        """
        if speculate is None:
            speculate = self.default_speculate
        if isinstance(audio, (list, tuple)):
            return self._transcribe_batches(audio, batch_size, sample_rate, on_text, on_token, on_result,
                                            delay_ms=delay_ms, alternatives=alternatives, pause_ms=pause_ms,
                                            speculate=speculate)
        samples = self._samples(audio, sample_rate, "audio")
        session = self.stream(delay_ms=delay_ms, on_text=on_text, alternatives=alternatives,
                              pause_ms=pause_ms, on_token=on_token, speculate=speculate)
        session.expect(samples.size)
        session.feed(samples)
        session.finish()
        return Transcription.from_session(session)

    def _samples(self, audio: str | os.PathLike | np.ndarray, sample_rate: int, name: str) -> np.ndarray:
        if isinstance(audio, (str, os.PathLike)):
            samples = load_audio(audio, self.sample_rate)
        else:
            samples = prepare_audio(audio, sample_rate, self.sample_rate, name=name)
        if samples.size == 0:
            raise AudioError(f"{name}: contains no samples")
        return samples

    def _transcribe_batches(self, audio: Sequence, batch_size: int, sample_rate: int, on_text, on_token,
                            on_result, **options) -> list[Transcription]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of recordings, 1 or more, not {batch_size!r}")
        if cpu_quant.adopted(self.net) or mkl_bf16.adopted(self.net):
            # The CPU row kernels read the weights once for up to 32 streams; a step of more is
            # multiplied stream by stream (`host.linear`), each reading every weight.
            batch_size = min(batch_size, cpu_kernels.MAX_ROWS)
        results: list[Transcription] = []
        for start in range(0, len(audio), batch_size):
            # Loaded a batch at a time, so that a long list never holds all its audio at once.
            batch = [self._samples(a, sample_rate, f"audio[{start + j}]")
                     for j, a in enumerate(audio[start : start + batch_size])]
            results += self._transcribe_batch(batch, start, on_text, on_token, on_result, **options)
        return results

    def _transcribe_batch(self, batch: list[np.ndarray], first: int, on_text, on_token, on_result,
                          **options) -> list[Transcription]:
        results: list[Transcription | None] = [None] * len(batch)

        def on_end(j: int):
            results[j] = Transcription.from_session(session, j)
            if on_result is not None:
                on_result(first + j, results[j])

        session = StreamingSession.lockstep(
            self.net, self.tokenizer, self.audio, len(batch), on_end=on_end,
            on_text=None if on_text is None else lambda j, text: on_text(first + j, text),
            on_token=None if on_token is None else lambda j, record: on_token(first + j, record), **options)
        session.finish_batch(batch)
        return results


# Writers: each renders a whole transcription as the text of one file.

FORMATS = ("txt", "json", "srt", "vtt", "tsv")


def _timestamp(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal}{ms % 1000:03d}"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _cues(result: Transcription) -> Iterable[tuple[Segment, list[str]]]:
    for segment in result.segments:
        lines = _lines(segment.text)
        if lines:
            yield segment, lines


# Subtitle cues: at most this many characters per line and lines per cue (Netflix's rules for
# Latin scripts); 0 is no limit.
MAX_LINE_WIDTH = 42
MAX_LINE_COUNT = 2


def _check_limit(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number, 0 (no limit) or more, not {value!r}")
    return value


def subtitle_cues(result: Transcription, max_line_width: int = MAX_LINE_WIDTH,
                  max_line_count: int = MAX_LINE_COUNT) -> list[tuple[float, float, list[str]]]:
    """The cues of `result`'s subtitles: (start, end, lines). Each segment's words are set in
    lines of at most `max_line_width` characters (a longer word has a line of its own; a newline
    in the text breaks the line) and the lines in cues of at most `max_line_count`, each from
    the start of its first word to the end of its last; 0 is no limit (0 and 0: a cue per
    segment, lines where its text has newlines)."""
    width = _check_limit(max_line_width, "max_line_width")
    count = _check_limit(max_line_count, "max_line_count")
    cues = []
    for segment in result.segments:
        # Lines as [start, end, text] from the words (a segment read without them: its text).
        words = segment.words or [Word(segment.start, segment.end, segment.text, math.nan)]
        lines: list[list] = []
        line = None
        for word in words:
            for i, part in enumerate(word.text.split("\n")):
                if i:
                    line = None  # a newline ends the line
                if not part.strip():
                    if line is not None:
                        line[2] += part
                    continue
                # (a line has text from its start: a longer word alone overflows it)
                if line is None or (width and len((line[2] + part).strip()) > width):
                    line = [word.start, word.end, part]
                    lines.append(line)
                else:
                    line[1], line[2] = word.end, line[2] + part
        lines = [(a, b, text.strip()) for a, b, text in lines if text.strip()]
        step = count or max(len(lines), 1)
        for k in range(0, len(lines), step):
            group = lines[k : k + step]
            cues.append((group[0][0], group[-1][1], [text for _, _, text in group]))
    return cues


def to_txt(result: Transcription) -> str:
    """One segment per line."""
    return "".join(" ".join(lines) + "\n" for _, lines in _cues(result))


def to_json(result: Transcription) -> str:
    return json.dumps(result.to_dict(), ensure_ascii=False) + "\n"


def to_srt(result: Transcription, max_line_width: int = MAX_LINE_WIDTH, max_line_count: int = MAX_LINE_COUNT) -> str:
    """SubRip: numbered cues (`subtitle_cues`), `HH:MM:SS,mmm` times; `-->` in the text becomes `->`."""
    out = []
    for n, (start, end, lines) in enumerate(subtitle_cues(result, max_line_width, max_line_count), start=1):
        text = "\n".join(lines).replace("-->", "->")
        out.append(f"{n}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n\n")
    return "".join(out)


def to_vtt(result: Transcription, max_line_width: int = MAX_LINE_WIDTH, max_line_count: int = MAX_LINE_COUNT) -> str:
    """WebVTT: cues as `to_srt`'s, `HH:MM:SS.mmm` times; `&`, `<` and `>` escaped as the format requires."""
    out = ["WEBVTT\n\n"]
    for start, end, lines in subtitle_cues(result, max_line_width, max_line_count):
        text = "\n".join(lines).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        out.append(f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{text}\n\n")
    return "".join(out)


def to_tsv(result: Transcription) -> str:
    """Tab-separated `start`, `end` (integer milliseconds) and `text`, with a header."""
    rows = ["start\tend\ttext\n"]
    for s, lines in _cues(result):
        text = " ".join(lines).replace("\t", " ")
        rows.append(f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{text}\n")
    return "".join(rows)


WRITERS: dict[str, Callable[[Transcription], str]] = {
    "txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv,
}


def write_outputs(result: Transcription, output_dir: str | os.PathLike, name: str,
                  formats: str | Iterable[str] = FORMATS, max_line_width: int = MAX_LINE_WIDTH,
                  max_line_count: int = MAX_LINE_COUNT) -> list[Path]:
    """Write `output_dir/name.<format>` for each format (one, or several; created if needed);
    return the paths. `max_line_width` and `max_line_count` lay out srt and vtt cues
    (`subtitle_cues`)."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    layout = dict(max_line_width=_check_limit(max_line_width, "max_line_width"),
                  max_line_count=_check_limit(max_line_count, "max_line_count"))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        if fmt not in WRITERS:
            raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
        path = output_dir / f"{name}.{fmt}"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(WRITERS[fmt](result, **layout) if fmt in ("srt", "vtt") else WRITERS[fmt](result))
        paths.append(path)
    return paths
