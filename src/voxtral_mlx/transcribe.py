"""The user-facing model: transcribe audio offline or open a streaming session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from .audio import SAMPLE_RATE, AudioError, load_audio, prepare_audio
from .config import AudioArgs
from .model import VoxtralRealtime
from .streaming import StreamingSession
from .tokenizer import Tekken


@dataclass
class Transcription:
    """The result of `Voxtral.transcribe`.

    Attributes:
        text: the transcript.
        tokens: every generated id after the prompt, control tokens included, one per 80 ms.
        delay_ms: the transcription delay used.
        duration: seconds of input audio.
    """

    text: str
    tokens: list[int]
    delay_ms: int
    duration: float


class Voxtral:
    """Voxtral Realtime, loaded by `voxtral_mlx.load`."""

    def __init__(self, net: VoxtralRealtime, tokenizer: Tekken, audio: AudioArgs, path: Path):
        self.net = net
        self.tokenizer = tokenizer
        self.audio = audio
        self.path = path

    @property
    def dtype(self) -> mx.Dtype:
        return self.net.dtype

    @property
    def sample_rate(self) -> int:
        return self.audio.sampling_rate

    def stream(self, delay_ms: int | None = None, interval_ms: float | None = None,
               on_text: Callable[[str], None] | None = None) -> StreamingSession:
        """Open a streaming session.

        Args:
            delay_ms: transcription delay, 80..1200 in steps of 80, or 2400; default from tekken.json.
            interval_ms: run the model only once this much new audio is ready (default: every token).
            on_text: called with each piece of text as soon as it is final.
        """
        return StreamingSession(self.net, self.tokenizer, self.audio, delay_ms=delay_ms,
                                interval_ms=interval_ms, on_text=on_text)

    def transcribe(self, audio: str | os.PathLike | np.ndarray, delay_ms: int | None = None,
                   sample_rate: int = SAMPLE_RATE,
                   on_text: Callable[[str], None] | None = None) -> Transcription:
        """Transcribe a whole recording.

        Args:
            audio: a file path, or mono samples (float in [-1, 1] or integer PCM).
            delay_ms: transcription delay, 80..1200 in steps of 80, or 2400; default from tekken.json.
            sample_rate: the rate of an array `audio` (resampled to 16 kHz); ignored for files.
            on_text: called with each piece of text as soon as it is decoded.
        """
        if isinstance(audio, (str, os.PathLike)):
            samples = load_audio(audio, self.sample_rate)
        else:
            samples = prepare_audio(audio, sample_rate, self.sample_rate)
        if samples.size == 0:
            raise AudioError("audio: contains no samples")
        session = self.stream(delay_ms=delay_ms, on_text=on_text)
        text = session.feed(samples) + session.finish()
        return Transcription(text=text, tokens=list(session.tokens), delay_ms=session.delay_ms,
                             duration=samples.size / self.sample_rate)
