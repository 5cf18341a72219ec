"""Live transcription from a microphone: capture, silence gate, backlog policy.

The PortAudio callback only copies samples into a bounded buffer; resampling, the gate and
all model work happen in the consuming thread.
"""

from __future__ import annotations

import collections
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .audio import SAMPLE_RATE, check_amount

# Gate thresholds on the RMS of an 80 ms block, in dB below full scale.
OPEN_DB = -42.0
CLOSE_DB = -48.0
PREROLL_BLOCKS = 4
# Audio waiting longer than this is dropped, oldest first.
MAX_BACKLOG_S = 10.0
# Backlog that counts as falling behind (processing runs in bursts of up to a few tokens).
BEHIND_S = 2.0
# Audio fed to the model at a time (tokens of 80 ms): a backlog's text appears as it is decoded,
# with speculative passes of up to 8 positions.
FEED_TOKENS = 8


class MicError(RuntimeError):
    """No audio library, no input device, or the device failed; the message says what to do."""


def _sounddevice():
    try:
        import sounddevice
    except ImportError as e:
        if "sounddevice" in str(e):
            raise MicError("microphone capture needs the sounddevice package: pip install 'voxtral-mlx[mic]'") from None
        raise
    except OSError:
        hint = "brew install portaudio" if sys.platform == "darwin" else \
            "sudo apt install libportaudio2 (Debian/Ubuntu) or your system's PortAudio package"
        raise MicError(f"the PortAudio library is not installed: {hint}") from None
    return sounddevice


def list_input_devices() -> list[dict]:
    """Input devices: index, name, channels, default_samplerate, default (bool)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        default = sd.default.device[0]
    except sd.PortAudioError as e:
        raise MicError(f"cannot list audio devices: {e}") from None
    return [
        {"index": i, "name": d["name"], "channels": d["max_input_channels"],
         "default_samplerate": d["default_samplerate"], "default": i == default}
        for i, d in enumerate(devices) if d["max_input_channels"] > 0
    ]


def input_device(device: int | str | None = None) -> dict:
    """PortAudio's description of an input device (index, or part of its name; None: the
    default input); MicError, saying how to list them, where there is none."""
    sd = _sounddevice()
    try:
        return sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as e:
        which = "no default input device" if device is None else f"no input device {device!r}"
        raise MicError(f"{which} ({e}); list them with `voxtral-mlx mic --list-devices`") from None


class CaptureBuffer:
    """Blocks from the audio thread to the consumer, bounded: past `max_seconds` the oldest goes."""

    def __init__(self, rate: int, max_seconds: float = MAX_BACKLOG_S):
        self.rate = rate
        self.max_samples = int(max_seconds * rate)
        self._blocks: collections.deque = collections.deque()
        self._size = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.dropped = 0

    def push(self, block: np.ndarray):
        with self._lock:
            self._blocks.append(block)
            self._size += block.shape[0]
            while self._size > self.max_samples and len(self._blocks) > 1:
                old = self._blocks.popleft()
                self._size -= old.shape[0]
                self.dropped += old.shape[0]
        self._ready.set()

    def pop_all(self, timeout: float) -> np.ndarray:
        self._ready.wait(timeout)
        with self._lock:
            blocks, self._blocks, self._size = list(self._blocks), collections.deque(), 0
            self._ready.clear()
        return np.concatenate(blocks) if blocks else np.zeros((0, 1), np.int16)

    @property
    def backlog_seconds(self) -> float:
        return self._size / self.rate

    @property
    def dropped_seconds(self) -> float:
        return self.dropped / self.rate


class Microphone:
    """An input device as float32 16 kHz mono chunks.

    Captures 16-bit mono at 16 kHz when the device allows it, else at the device's own rate
    (converted with soxr). `duration` stops capture after that many seconds.
    """

    def __init__(self, device: int | str | None = None, duration: float | None = None,
                 max_backlog_s: float = MAX_BACKLOG_S, sample_rate: int = SAMPLE_RATE):
        self.device = device
        self.duration = check_amount(duration, "seconds", name="duration")
        self.max_backlog_s = max_backlog_s
        self.sample_rate = sample_rate
        self.stream = None
        self.error: str | None = None
        self._captured = 0
        self._done = threading.Event()

    def __enter__(self) -> "Microphone":
        sd = self._sd = _sounddevice()
        info = input_device(self.device)
        self.name = info["name"]
        # 16 kHz mono if the device does it, else its own rate, else also its channels (averaged).
        native = int(info["default_samplerate"])
        for self.rate, self.channels in ((self.sample_rate, 1), (native, 1),
                                         (native, max(1, min(2, info["max_input_channels"])))):
            try:
                sd.check_input_settings(self.device, channels=self.channels, dtype="int16", samplerate=self.rate)
                break
            except Exception:
                continue
        self.limit = None if self.duration is None else int(self.duration * self.rate)
        self.buffer = CaptureBuffer(self.rate, self.max_backlog_s)
        self._resampler = None
        if self.rate != self.sample_rate:
            import soxr

            self._resampler = soxr.ResampleStream(self.rate, self.sample_rate, 1, dtype="float32", quality="HQ")
        try:
            self.stream = sd.InputStream(device=self.device, channels=self.channels, dtype="int16", samplerate=self.rate,
                                         callback=self._callback, finished_callback=self._done.set)
            self.stream.start()
        except Exception as e:
            raise MicError(f"cannot open {self.name!r} for recording ({e}); is it busy or unplugged?") from None
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            try:
                self.stream.close(ignore_errors=True)
            except Exception:
                pass

    def _callback(self, indata, frames, time, status):
        block = indata
        if self.limit is not None:
            block = block[: self.limit - self._captured]
        self.buffer.push(block.copy())
        self._captured += block.shape[0]
        if self.limit is not None and self._captured >= self.limit:
            raise self._sd.CallbackStop

    @property
    def finished(self) -> bool:
        """The requested duration was captured and everything was read."""
        return self.limit is not None and self._captured >= self.limit and self.buffer.backlog_seconds == 0

    def read(self, timeout: float = 0.1) -> np.ndarray:
        """Samples captured since the last call (may be empty); MicError if the device failed."""
        stopped = self._done.is_set() or not self.stream.active
        raw = self.buffer.pop_all(0 if stopped else timeout)
        if stopped and not raw.size and not self.finished:
            raise MicError(f"recording from {self.name!r} stopped: the device was unplugged or failed")
        samples = (raw.mean(axis=1) if raw.ndim == 2 else raw).astype(np.float32) / 32768
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=self.finished)
        return samples

    @property
    def dropped_seconds(self) -> float:
        return self.buffer.dropped_seconds


class EnergyGate:
    """Skips long silences in whole 80 ms blocks, so the model's token grid stays aligned.

    Opens on a block louder than `open_db` (feeding `preroll` quieter blocks before it),
    closes after `hangover` consecutive blocks quieter than `close_db`, then asks for a flush.
    """

    def __init__(self, block: int, hangover: int, open_db: float = OPEN_DB, close_db: float = CLOSE_DB,
                 preroll: int = PREROLL_BLOCKS):
        self.block = block
        self.hangover = hangover
        self.open_db = open_db
        self.close_db = close_db
        self.is_open = False
        self._quiet = 0
        self._pending = np.zeros(0, np.float32)
        self._preroll: collections.deque = collections.deque(maxlen=preroll)
        self.skipped = 0

    def process(self, samples: np.ndarray) -> list[tuple[str, np.ndarray | None]]:
        """("feed", samples) and ("flush", None) steps for the next samples."""
        data = np.concatenate([self._pending, samples])
        n = data.size // self.block * self.block
        self._pending = data[n:]
        steps: list[tuple[str, np.ndarray | None]] = []
        for start in range(0, n, self.block):
            block = data[start : start + self.block]
            level = 10 * np.log10(np.mean(np.square(block, dtype=np.float64)) + 1e-20)
            if self.is_open:
                self._quiet = self._quiet + 1 if level < self.close_db else 0
                steps.append(("feed", block))
                if self._quiet >= self.hangover:
                    steps.append(("flush", None))
                    self.is_open = False
            elif level >= self.open_db:
                self.is_open, self._quiet = True, 0
                steps.extend(("feed", b) for b in self._preroll)
                self._preroll.clear()
                steps.append(("feed", block))
            else:
                if len(self._preroll) == self._preroll.maxlen:
                    self.skipped += self.block
                self._preroll.append(block)
        return _merge(steps)

    def end(self) -> list[tuple[str, np.ndarray | None]]:
        """The partial block at the end, when the gate is open."""
        rest, self._pending = self._pending, np.zeros(0, np.float32)
        if self.is_open and rest.size:
            return [("feed", rest)]
        self.skipped += rest.size
        return []


def _merge(steps):
    """Consecutive feeds as one array, so the encoder sees them in one pass."""
    out: list[tuple[str, np.ndarray | None]] = []
    for kind, x in steps:
        if kind == "feed" and out and out[-1][0] == "feed":
            out[-1] = ("feed", np.concatenate([out[-1][1], x]))
        else:
            out.append((kind, x))
    return out


def transcribe_live(model, source, *, delay_ms: int | None = None, interval_ms: float | None = None,
                    vad: bool = True, stop: threading.Event | None = None,
                    on_status: Callable[[str], None] | None = None,
                    stats: dict | None = None) -> Iterator[str]:
    """Text deltas from a live source (a `Microphone`, or anything with its `read`/`finished`).

    Ends when `stop` is set or the source is finished, then flushes and yields the rest; a
    device failure also ends it, after the rest is yielded, with `MicError`. `on_status`
    hears about falling behind; `stats` receives the seconds heard, fed, skipped and dropped.
    """
    # Behind real time (a slow machine), several tokens' audio waits at each read: decoded
    # speculatively where that gives the same tokens at about a step's cost.
    session = model.stream(delay_ms=delay_ms, interval_ms=interval_ms, speculate=model.default_speculate)
    spt = model.audio.samples_per_token
    gate = EnergyGate(spt, hangover=session.n_delay + 11) if vad else None
    warned, error, heard = False, None, 0
    try:
        while not (stop is not None and stop.is_set()) and not source.finished:
            samples = source.read()
            heard += samples.size
            waiting = samples.size / model.sample_rate
            if not warned and waiting > BEHIND_S and on_status is not None:
                limit = getattr(source, "max_backlog_s", MAX_BACKLOG_S)
                on_status(f"falling behind real time: {waiting:.1f} s of audio were waiting; "
                          f"beyond {limit:.0f} s the oldest audio is skipped")
                warned = True
            for kind, x in gate.process(samples) if gate is not None else [("feed", samples)]:
                # A backlog (behind real time) is fed in pieces, so its text shows as it is decoded.
                pieces = [None] if kind == "flush" else range(0, x.size, FEED_TOKENS * spt) if x.size else [0]
                for start in pieces:
                    text = session.flush() if kind == "flush" else session.feed(x[start : start + FEED_TOKENS * spt])
                    if text:
                        yield text
    except MicError as e:
        error = e
    # What capture dropped while it was being listened to, not while the rest is decoded.
    dropped = getattr(source, "dropped_seconds", 0.0)
    for kind, x in gate.end() if gate is not None else []:
        text = session.feed(x) if kind == "feed" else session.flush()
        if text:
            yield text
    text = session.finish()
    if text:
        yield text
    if stats is not None:
        stats.update(heard=heard / model.sample_rate, fed=session.audio_seconds,
                     skipped=0.0 if gate is None else gate.skipped / model.sample_rate,
                     dropped=dropped)
    if error is not None:
        raise error


def mic(model=None, device: int | str | None = None, delay_ms: int | None = None, vad: bool = True,
        interval: float | None = None, duration: float | None = None) -> Iterator[str]:
    """Transcribe the microphone live, yielding text as it becomes final (for notebooks).

    Stops on Ctrl+C (or the notebook's interrupt) or after `duration` seconds, and yields
    what was still being decoded before it ends.

    Args:
        model: a loaded `Voxtral`, or a model directory / repo id to load (default: the official one).
        device: input device index or name (default: the system's default input).
        delay_ms: transcription delay, 80..1200 in steps of 80, or 2400.
        vad: skip long silences (after flushing) instead of feeding them to the model.
        interval: seconds of new audio between model runs (default: every 80 ms token).
        duration: stop after this many seconds of audio.
    """
    check_amount(interval, "seconds", zero=True, name="interval")
    check_amount(duration, "seconds", name="duration")
    input_device(device)  # before a model is loaded (or downloaded) for a machine without one
    if model is None or isinstance(model, (str, Path)):
        from .weights import DEFAULT_MODEL, load

        model = load(model or DEFAULT_MODEL)
    model.prepare(delay_ms)  # before the microphone opens: the first words are not late by it
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with Microphone(device, duration=duration) as source:
            yield from transcribe_live(model, source, delay_ms=delay_ms,
                                       interval_ms=None if interval is None else interval * 1000, vad=vad,
                                       stop=stop, on_status=lambda m: warnings.warn(m, stacklevel=2))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
