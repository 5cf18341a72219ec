"""Audio in: decoding files, resampling, and the log-mel front end."""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator

import mlx.core as mx
import numpy as np

from .config import AudioArgs

SAMPLE_RATE = 16000
MAX_CHANNELS = 64


class AudioError(ValueError):
    """Audio that cannot be read or used: the message says which file and why."""


def check_amount(value: float | None, unit: str, zero: bool = False, name: str | None = None) -> float | None:
    """`value`: None, or a finite number of `unit` above 0 (or 0 itself with `zero`); a
    ValueError naming `name` (where given) otherwise."""
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and (0 <= value if zero else 0 < value) and value < math.inf):
        raise ValueError(f"{name + ' ' if name else ''}must be a number of {unit} {'from 0' if zero else 'above 0'}, "
                         f"not {value!r}")
    return value


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
    if path.is_file() and path.stat().st_size == 0:
        raise AudioError(f"{path}: is empty (0 bytes)")
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
        with _quiet_stderr():
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise _NotSoundfile(str(e)) from None
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0], rate


@contextlib.contextmanager
def _quiet_stderr():
    """Silence libsndfile's decoders, which print notes about corrupt files straight to fd 2."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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

    Integer PCM is scaled to [-1, 1); the channels of 2-D input, (frames, channels) or
    (channels, frames), are averaged: an array is (frames, channels) as soundfile and
    sounddevice give it where its second dimension could be channels (up to 64), so that a
    stream's few-frame chunks (1 frame of stereo: shape (1, 2)) keep their layout.
    """
    samples = np.asarray(samples)
    if samples.dtype.kind in "iu":
        info = np.iinfo(samples.dtype)
        samples = (samples.astype(np.float64) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
    elif samples.dtype.kind != "f":
        raise AudioError(f"{name}: expected float or integer PCM samples, got dtype {samples.dtype}")
    if samples.ndim == 2:
        # (frames, channels) as soundfile gives, or (channels, frames) as torchaudio and librosa do.
        axis = 1 if samples.shape[1] <= MAX_CHANNELS else 0
        if samples.shape[axis] > MAX_CHANNELS:
            raise AudioError(f"{name}: cannot tell channels from frames in an array of shape {samples.shape}; "
                             "pass mono samples or (frames, channels)")
        samples = samples.mean(axis=axis)
    elif samples.ndim != 1:
        raise AudioError(f"{name}: expected a 1-D array of mono samples, got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: samples contain NaN or infinity")
    if isinstance(rate, (float, np.floating)) and float(rate).is_integer():
        rate = int(rate)  # 44100.0, as some libraries give it
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"{name}: invalid sample rate {rate!r}: a whole number of samples per second is needed")
    samples = samples.astype(np.float32, copy=False)
    if rate != sample_rate and samples.size:
        import soxr

        samples = soxr.resample(samples, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(samples)


_WAV_PCM, _WAV_FLOAT, _WAV_ALAW, _WAV_MULAW, _WAV_EXTENSIBLE = 1, 3, 6, 7, 0xFFFE
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)
_WAV_MAGIC = (b"RIFF", b"RF64", b"BW64")  # RF64 and BW64: WAV past 4 GB, data size in a ds64 chunk
# Streams stdin does not decode, by their first bytes: (offset, signature, name).
_COMPRESSED = ((0, b"ID3", "MP3"), (0, b"fLaC", "FLAC"), (0, b"OggS", "Ogg"), (4, b"ftyp", "MP4/M4A"),
               (0, b"\x1aE\xdf\xa3", "Matroska/WebM"), (0, b"FORM", "AIFF"), (0, b"#!AMR", "AMR"))


def read_pcm_stream(stream: BinaryIO, sample_rate: int = SAMPLE_RATE,
                    block_bytes: int = 4096) -> Iterator[np.ndarray]:
    """Float32 mono chunks at `sample_rate` from a pipe, as soon as bytes arrive.

    A stream that starts with a WAV header (RIFF, RF64 or BW64) is read per its format (PCM
    8/16/24/32-bit, float, A-law or mu-law, any rate and channel count; a data size of 0 or
    0xFFFFFFFF, as written by ffmpeg into a pipe, means "until the end"); a compressed stream
    (MP3, FLAC, Ogg, ...) is refused with the command that turns it into WAV; anything else is
    raw s16le 16 kHz mono.
    """
    head = _read_exactly(stream, 12)
    if len(head) == 12 and head[:4] in _WAV_MAGIC and head[8:12] == b"WAVE":
        kind, width, channels, rate, remaining = _wav_header(stream)
        pending = b""
    elif compressed := next((name for at, magic, name in _COMPRESSED if head[at : at + len(magic)] == magic), None):
        raise AudioError(f"stdin: {compressed} data (compressed audio); stdin takes "
                         "raw 16-bit PCM or WAV: pipe it through `ffmpeg -loglevel error -i - -f wav -`, "
                         "or give the file's path")
    else:
        kind, width, channels, rate, remaining = _WAV_PCM, 2, 1, sample_rate, None
        pending = head
    frame = width * channels
    resampler = None
    if rate != sample_rate:
        import soxr

        resampler = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
    while True:
        want = block_bytes if remaining is None else min(block_bytes, remaining)
        data = _read_some(stream, want) if want else b""
        if remaining is not None:
            remaining -= len(data)
        pending += data
        usable = len(pending) - len(pending) % frame
        if usable:
            samples = _decode_pcm(pending[:usable], kind, width, channels)
            pending = pending[usable:]
            if resampler is not None:
                samples = resampler.resample_chunk(samples)
            if samples.size:
                yield samples
        if not data:
            break
    if resampler is not None:
        tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if tail.size:
            yield tail


class PipeReader:
    """`read_pcm_stream(stream)` read ahead on a thread, up to `max_seconds` of audio, so that a
    live recorder writing into the pipe is not held up while the model decodes; past that the
    pipe waits, and a file piped in is read as fast as it is transcribed.

    `behind_seconds` is the audio waiting here if it comes from a live source (one that
    delivered at most 1.5x real time while there was room to read ahead), else 0.
    """

    def __init__(self, stream: BinaryIO, sample_rate: int = SAMPLE_RATE, max_seconds: float = 10.0):
        self.sample_rate = sample_rate
        self._chunks = read_pcm_stream(stream, sample_rate)
        self._limit = max(1, int(max_seconds * sample_rate))
        self._queue: collections.deque = collections.deque()
        self._waiting = 0
        self._cond = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self._free_seconds, self._free_samples = 0.0, 0  # reads made while there was room
        threading.Thread(target=self._run, name="voxtral-mlx-pipe", daemon=True).start()

    def _run(self):
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._waiting < self._limit)
                start = time.monotonic()
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                with self._cond:
                    self._free_seconds += time.monotonic() - start
                    self._free_samples += chunk.size
                    self._queue.append(chunk)
                    self._waiting += chunk.size
                    self._cond.notify_all()
        except Exception as e:  # an unreadable stream: raised by `take`
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def take(self, timeout: float | None = None) -> np.ndarray | None:
        """Every sample waiting, after waiting up to `timeout` for some (so possibly none); None
        once the stream has ended and everything was taken."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._done, timeout)
            if self._queue:
                chunks = list(self._queue)
                self._queue.clear()
                self._waiting = 0
                self._cond.notify_all()
                return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            return np.zeros(0, np.float32)

    @property
    def behind_seconds(self) -> float:
        with self._cond:
            live = self._free_samples < 1.5 * self._free_seconds * self.sample_rate
            return self._waiting / self.sample_rate if live else 0.0


def _read_some(stream: BinaryIO, n: int) -> bytes:
    read1 = getattr(stream, "read1", None)
    return read1(n) if read1 is not None else stream.read(n)


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = _read_some(stream, n - len(out))
        if not data:
            break
        out += data
    return out


def _wav_header(stream: BinaryIO) -> tuple[int, int, int, int, int | None]:
    fmt = None
    while True:
        chunk = _read_exactly(stream, 8)
        if len(chunk) < 8:
            raise AudioError("stdin: WAV stream ends before its data chunk")
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"data":
            break
        body = _read_exactly(stream, size + (size & 1))
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioError("stdin: WAV fmt chunk is too short")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _WAV_EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, bits, channels, rate)
    if fmt is None:
        raise AudioError("stdin: WAV stream has no fmt chunk before its data")
    tag, bits, channels, rate = fmt
    if (tag, bits) not in ((_WAV_PCM, 8), (_WAV_PCM, 16), (_WAV_PCM, 24), (_WAV_PCM, 32), (_WAV_FLOAT, 32),
                           (_WAV_FLOAT, 64), (_WAV_ALAW, 8), (_WAV_MULAW, 8)) or channels < 1 or rate < 1:
        raise AudioError(f"stdin: unsupported WAV format (tag {tag}, {bits} bits, {channels} channels, {rate} Hz)")
    return tag, bits // 8, channels, rate, None if size in _UNKNOWN_SIZES else size


@functools.lru_cache(maxsize=None)
def _g711(kind: int) -> np.ndarray:
    """The 256 values of G.711 A-law or mu-law bytes, as float32 in [-1, 1)."""
    b = np.arange(256, dtype=np.int32)
    if kind == _WAV_MULAW:
        b = ~b & 0xFF
        exponent, mantissa = (b >> 4) & 7, b & 15
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    else:
        b = b ^ 0x55
        exponent, mantissa = (b >> 4) & 7, b & 15
        shift = np.maximum(exponent - 1, 0)
        magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << shift)
    sign = (b & 0x80) != 0
    return (np.where(sign == (kind == _WAV_MULAW), -magnitude, magnitude) / 32768).astype(np.float32)


def _decode_pcm(data: bytes, kind: int, width: int, channels: int) -> np.ndarray:
    if kind in (_WAV_ALAW, _WAV_MULAW):
        x = _g711(kind)[np.frombuffer(data, np.uint8)]
    elif kind == _WAV_FLOAT:
        x = np.frombuffer(data, "<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 1:
        x = (np.frombuffer(data, np.uint8).astype(np.float32) - 128) / 128
    elif width == 3:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2**23
    else:
        x = np.frombuffer(data, "<i2" if width == 2 else "<i4").astype(np.float32) / 2 ** (8 * width - 1)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x.astype(np.float32, copy=False)


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
    `hop*i0 - window/2` and holds `hop*(F-1) + window` samples gives frames `i0 .. i0+F-1`:
    [S] -> [F, n_mels], or for B streams [B, S] -> [B, F, n_mels].
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
        S = span.shape[-1]
        shape, strides = ((S - self.window_size) // self.hop + 1, self.window_size), (self.hop, 1)
        if span.ndim == 2:
            shape, strides = (span.shape[0], *shape), (S, *strides)
        frames = mx.as_strided(span, shape, strides)  # [B, F, 400]
        spec = mx.fft.rfft(frames * self.window, n=self.window_size)  # [B, F, 201]
        power = mx.square(spec.real) + mx.square(spec.imag)
        mel = power @ self.filters  # [B, F, n_mels]
        log = mx.maximum(mx.log10(mx.maximum(mel, 1e-10)), self.floor)
        return (log + 4.0) / 4.0
