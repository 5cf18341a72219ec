"""Audio in: decoding files, resampling, and the log-mel front end."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import AudioArgs

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """Audio that cannot be read or used: the message says which file and why."""


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file to float32 mono samples at `sample_rate`.

    WAV, FLAC, OGG and MP3 are read with libsndfile (soundfile); anything else goes
    through `ffmpeg` when it is installed. Channels are averaged; the rate is converted
    with soxr (high quality).
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if not os.access(path, os.R_OK):
        raise AudioError(f"{path}: permission denied")
    try:
        samples, rate = _read_soundfile(path)
    except _NotSoundfile as e:
        samples, rate = _read_ffmpeg(path, sample_rate, reason=str(e)), sample_rate
    if samples.size == 0:
        raise AudioError(f"{path}: contains no audio samples")
    return prepare_audio(samples, rate, sample_rate, name=str(path))


class _NotSoundfile(Exception):
    pass


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise _NotSoundfile(str(e)) from None
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0], rate


def _read_ffmpeg(path: Path, sample_rate: int, reason: str) -> np.ndarray:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            f"{path}: not a WAV, FLAC, OGG or MP3 file that libsndfile can read ({reason}); "
            "install ffmpeg to read other formats"
        )
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-f", "f32le",
           "-ac", "1", "-ar", str(sample_rate), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(f"{path}: ffmpeg cannot decode it ({detail[-1] if detail else 'no audio stream'})")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)


def prepare_audio(samples, rate: int = SAMPLE_RATE, sample_rate: int = SAMPLE_RATE,
                  name: str = "audio") -> np.ndarray:
    """Validate samples and return them as float32 mono at `sample_rate`.

    Integer PCM is scaled to [-1, 1); 2-D input is (frames, channels) and is averaged.
    """
    samples = np.asarray(samples)
    if samples.dtype.kind in "iu":
        info = np.iinfo(samples.dtype)
        samples = (samples.astype(np.float64) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
    elif samples.dtype.kind != "f":
        raise AudioError(f"{name}: expected float or integer PCM samples, got dtype {samples.dtype}")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise AudioError(f"{name}: expected a 1-D array of mono samples, got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: samples contain NaN or infinity")
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"{name}: invalid sample rate {rate!r}")
    samples = samples.astype(np.float32, copy=False)
    if rate != sample_rate and samples.size:
        import soxr

        samples = soxr.resample(samples, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(samples)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-scale, area-normalised triangular filters, [n_fft // 2 + 1, n_mels], float64."""

    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < min_log_hz, f / f_sp, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep)

    def mel_to_hz(m):
        return np.where(m < min_log_mel, m * f_sp, min_log_hz * np.exp(logstep * (m - min_log_mel)))

    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(edges)
    rising = (fft_hz[None, :] - edges[:-2, None]) / widths[:-1, None]
    falling = (edges[2:, None] - fft_hz[None, :]) / widths[1:, None]
    bank = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return bank.T


class LogMel:
    """Log-mel frames from a span of the padded signal (MODEL.md section 3).

    Frame `i` covers samples `[hop*i - window/2, hop*i + window/2)`; a span that starts at
    `hop*i0 - window/2` and holds `hop*(F-1) + window` samples gives frames `i0 .. i0+F-1`.
    """

    def __init__(self, args: AudioArgs):
        self.hop = args.hop_length
        self.window_size = args.window_size
        n = np.arange(args.window_size)
        self.window = mx.array((0.5 - 0.5 * np.cos(2 * np.pi * n / args.window_size)).astype(np.float32))
        self.filters = mx.array(
            mel_filters(args.sampling_rate, args.window_size, args.num_mel_bins).astype(np.float32)
        )
        self.floor = args.global_log_mel_max - 8.0

    def __call__(self, span: mx.array) -> mx.array:
        n_frames = (span.shape[0] - self.window_size) // self.hop + 1
        frames = mx.as_strided(span, (n_frames, self.window_size), (self.hop, 1))  # [F, 400]
        spec = mx.fft.rfft(frames * self.window, n=self.window_size)  # [F, 201]
        power = mx.square(spec.real) + mx.square(spec.imag)
        mel = power @ self.filters  # [F, n_mels]
        log = mx.maximum(mx.log10(mx.maximum(mel, 1e-10)), self.floor)
        return (log + 4.0) / 4.0
