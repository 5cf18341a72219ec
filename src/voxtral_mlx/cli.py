"""The `voxtral-mlx` command line."""

from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import threading
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn
import typer

from . import __version__, cpu_kernels, cpu_quant, mkl_bf16
from .audio import AudioError, PipeReader, check_amount, load_audio
from .config import ConfigError
from .mic import BEHIND_S
from .streaming import MAX_SPECULATE
from .timestamps import DEFAULT_PAUSE_MS
from .transcribe import FORMATS, MAX_LINE_COUNT, MAX_LINE_WIDTH, Transcription, write_outputs
from .weights import (DEFAULT_MODEL, ModelNotFoundError, WeightsError, blas_backend, load, load_config,
                      resolve_model)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown", help="Voxtral Realtime speech-to-text with MLX.")

BLAS_HINT = ("; MKL makes them over 10x faster: pip install 'voxtral-mlx[mkl]' (x86-64), or OpenBLAS "
             "about 3x: sudo apt install libopenblas0-pthread")
# Audio read ahead of the model from stdin: a live recorder's cushion when this machine is slower.
STDIN_AHEAD_S = 10.0
USER_ERRORS = (AudioError, ConfigError, ModelNotFoundError, WeightsError, ValueError, OSError)


def _status(verbose: bool, message: str):
    if verbose:
        typer.echo(message, err=True)


def _fail(message: str):
    typer.echo(f"voxtral-mlx: error: {message}", err=True)


def _version(value: bool):
    if value:
        typer.echo(f"voxtral-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Voxtral Realtime speech-to-text with MLX."""


class _Printer:
    """Writes text to stdout (or `stream`) as it arrives, without the transcript's leading
    space; with `hold`, keeps it until `end` and hands it over whole (progress bars share the
    terminal). `open_lines` holds the printers whose line is started and not yet ended."""

    open_lines: set = set()

    def __init__(self, hold=None, stream=None):
        self.started = self.ended = False
        self.hold = hold
        self.stream = stream
        self.parts: list[str] = []

    def __call__(self, text: str):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if not text:
            return
        if self.hold is not None:
            self.parts.append(text)
        else:
            stream = self.stream or sys.stdout
            stream.write(text)
            stream.flush()
            _Printer.open_lines.add(self)

    def end(self) -> bool:
        """End the transcript's line (once); whether it had any text."""
        if self.started and not self.ended:
            self.ended = True
            _Printer.open_lines.discard(self)
            if self.hold is not None:
                self.hold("".join(self.parts))
            else:
                stream = self.stream or sys.stdout
                stream.write("\n")
                stream.flush()
        return self.started


def _interruptible(command):
    """A command that Ctrl+C ends with its line of text ended, a message and exit code 130
    (typer would exit silently); commands that flush on Ctrl+C catch the first one themselves."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            for printer in list(_Printer.open_lines):
                printer.end()
            typer.echo("voxtral-mlx: interrupted", err=True)
            raise typer.Exit(130)

    return run


def _describe(voxtral) -> str:
    """How a loaded model multiplies, for --verbose."""
    described = mkl_bf16.describe(voxtral.net) or cpu_quant.describe(voxtral.net)
    if described:
        return described
    dtype = str(voxtral.dtype).rsplit(".", 1)[-1]
    bits = sorted({m.bits for _, m in voxtral.net.named_modules()
                   if isinstance(m, (mlx.nn.QuantizedLinear, mlx.nn.QuantizedEmbedding))})
    if bits:
        return f"{' and '.join(map(str, bits))}-bit products through MLX, {dtype} elsewhere"
    return dtype


def _load(path: Path, dtype: str | None, verbose: bool):
    """The model, loaded; the one-time build of the CPU kernels is announced, not silent; with
    `verbose`, how it multiplies, in what time, and the BLAS."""
    start = time.perf_counter()
    if mx.default_device() == mx.cpu and cpu_kernels.needs_build():
        typer.echo("voxtral-mlx: compiling the CPU kernels (once for this version and machine: several seconds)",
                   err=True)
    voxtral = load(path, dtype=dtype)
    _status(verbose, f"loaded {path} ({_describe(voxtral)}) in {time.perf_counter() - start:.1f} s on the "
                     f"{'GPU' if mx.default_device() == mx.gpu else 'CPU'}")
    if mx.default_device() == mx.cpu:
        _status(verbose, f"CPU matmuls: {blas_backend()}" + (BLAS_HINT if "reference" in blas_backend() else ""))
    return voxtral


def _check_model(model: str, delay_ms: int | None) -> Path:
    """The model directory, after the cheap checks (config files, delay) that precede the weights."""
    path = resolve_model(model)
    _, _, audio_args = load_config(path)
    try:
        audio_args.delay_tokens(delay_ms)
    except ValueError as e:
        raise ValueError(f"--delay-ms: {e}") from None
    return path


def _check_writable(path: Path) -> None:
    """OSError unless the file `path` can be written, found before any work; an existing file keeps
    its contents (it is replaced only once there is something to write), a new one is not left."""
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise OSError(f"--output {path}: cannot write it ({e.strerror or e})") from None
    if not existed:
        path.unlink()


def _check_output_dir(path: Path) -> None:
    """Create the directory `path` if needed; OSError unless files can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(f"--output-dir {path}: cannot write there ({e.strerror or e})") from None


def _terminate(signum, frame):
    """SIGTERM as Ctrl+C: the work in progress is cleaned up on the way out."""
    raise KeyboardInterrupt


def _finite(unit: str, zero: bool = False):
    """An option's check: a finite number above 0 (from 0 with `zero`), or none given
    (typer's ranges let nan and inf through)."""

    def check(value: float | None) -> float | None:
        try:
            return check_amount(value, unit, zero)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

    return check


class OutputFormat(str, Enum):
    txt = "txt"
    json = "json"
    srt = "srt"
    vtt = "vtt"
    tsv = "tsv"
    all = "all"


@app.command()
@_interruptible
def transcribe(
    files: List[str] = typer.Argument(..., help="Audio files (WAV, FLAC, OGG, MP3; others need ffmpeg), "
                                                  "or - to stream raw s16le 16 kHz mono or WAV from stdin."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="Model directory or Hugging Face repo id."),
    delay_ms: Optional[int] = typer.Option(None, "--delay-ms", "-d",
                                           help="Transcription delay: 80..1200 in steps of 80, or 2400 "
                                                "(default: from the model, 480)."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
                                        help="Compute dtype: float32, bfloat16 or float16 "
                                             "(default: float32 on CPU, bfloat16 on GPU; on an x86-64 CPU "
                                             "with MKL, bfloat16 is faster, see the README)."),
    interval_ms: Optional[float] = typer.Option(None, "--interval-ms", callback=_finite("milliseconds", zero=True),
                                                help="With -: run the model once this much audio has "
                                                     "arrived (higher = more throughput, more latency) "
                                                     "(default: every 80 ms token)."),
    output_format: Optional[List[OutputFormat]] = typer.Option(
        None, "--output-format", "-f", case_sensitive=False,
        help="Also write each transcript in this format (all: every one; repeatable: -f srt -f vtt) to "
             "--output-dir, named after its input: talk.mp3 -> talk.srt; stdin -> stdin.srt "
             "(default: all, with --output-dir)."),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir", "-o", file_okay=False,
        help="Directory for the --output-format files, created if needed (default: the current directory)."),
    max_line_width: int = typer.Option(
        MAX_LINE_WIDTH, "--max-line-width", min=0, metavar="N",
        help="Subtitles (srt, vtt): at most N characters per line, breaking between words (0: no limit)."),
    max_line_count: int = typer.Option(
        MAX_LINE_COUNT, "--max-line-count", min=0, metavar="N",
        help="Subtitles (srt, vtt): at most N lines per cue; a longer segment is shown in several (0: no limit)."),
    alt: int = typer.Option(0, "--alt", min=0, metavar="K",
                            help="Record the K most probable tokens and their probabilities at every "
                                 "step (in the json output)."),
    pause_ms: float = typer.Option(DEFAULT_PAUSE_MS, "--pause-ms", callback=_finite("milliseconds", zero=True),
                                   help="A segment (subtitle) ends at the end of a sentence or after a "
                                        "pause longer than this."),
    batch_size: int = typer.Option(4, "--batch-size", min=1,
                                   help="Files decoded together as one batch: each weight read serves all "
                                        "of them (faster; a decoder cache per file)."),
    speculate: Optional[int] = typer.Option(
        None, "--speculate", min=0, max=MAX_SPECULATE, metavar="K",
        help="Check K positions (2 to 32) per decoder pass, guessing pads where the audio is already in (same "
             "tokens; 0 or 1: off; default 8 where the CPU's row kernels multiply, else off). Not within batches "
             "of several files."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Status and timings on stderr."),
):
    """Transcribe audio files or a live stream; text is printed as it is decoded.

    Files are decoded --batch-size at a time as one batch; each transcript is exactly that of
    the file alone, and they are printed in input order. With --output-format or --output-dir,
    each transcript is also written to files: txt (one segment per line), json (segments, words
    and tokens with times and probabilities), srt, vtt and tsv. On a terminal, progress bars
    are shown on stderr.
    """
    inputs, failed = [], 0
    for name in files:
        if name != "-" and not Path(name).exists():
            _fail(f"{name}: no such file")
            failed += 1
        else:
            inputs.append(name)
    if files.count("-") > 1:
        _fail("stdin (-) can be given only once")
        raise typer.Exit(2)
    formats = _output_formats(output_format, output_dir)
    if alt and "json" not in formats:
        _fail("--alt: the alternatives are written in the json output; add -f json (or -f all)")
        raise typer.Exit(2)
    if formats:
        by_name = {}
        for i, name in enumerate(inputs):  # case-insensitively: macOS's and Windows's disks are
            other = by_name.setdefault(_output_name(name).casefold(), i)
            if other != i:
                _fail(f"{inputs[other]} and {name} would write the same files {_output_name(name)}.*; "
                      "rename one or transcribe them separately")
                raise typer.Exit(2)
        output_dir = output_dir or Path(".")
    if interval_ms is not None and "-" not in inputs:
        _fail("--interval-ms applies to a stream on stdin (-), not to files, which are decoded as fast as they can be")
        raise typer.Exit(2)
    if not inputs:
        raise typer.Exit(1)
    try:
        if formats:
            _check_output_dir(output_dir)
        path = _check_model(model, delay_ms)
        voxtral = _load(path, dtype, verbose)
        if speculate is None:
            speculate = voxtral.default_speculate
        if speculate > 1:
            alone = " (for a file alone; not within batches)" if len(inputs) > 1 and batch_size > 1 else ""
            _status(verbose, f"speculative pad decoding: up to {speculate} positions per decoder pass{alone}")
    except USER_ERRORS as e:
        _fail(str(e))
        raise typer.Exit(1)
    options = dict(delay_ms=delay_ms, alternatives=alt, pause_ms=pause_ms, speculate=speculate)
    outputs = functools.partial(write_outputs, output_dir=output_dir, formats=formats,
                                max_line_width=max_line_width, max_line_count=max_line_count) if formats else None
    with _Display(len(inputs), verbose, live="-" in inputs) as display:
        for group in _batches(inputs, batch_size):
            if group == ["-"]:
                failed += _stdin_input(voxtral, interval_ms, display, outputs, options)
            else:
                failed += _file_batch(voxtral, group, display, outputs, options)
    if failed:
        raise typer.Exit(1)


def _batches(inputs: list[str], size: int) -> list[list[str]]:
    """Consecutive files, up to `size` at a time; stdin on its own, where it was given."""
    groups: list[list[str]] = []
    for name in inputs:
        if name == "-" or not groups or groups[-1] == ["-"] or len(groups[-1]) == size:
            groups.append([name])
        else:
            groups[-1].append(name)
    return groups


def _stdin_input(voxtral, interval_ms, display, outputs, options) -> int:
    """Transcribe the live stream on stdin; returns the number of failures (0 or 1)."""
    printer, start = display.printer(), time.perf_counter()
    bar = display.start_file("stdin", None)
    try:
        result = _transcribe_stdin(voxtral, interval_ms, printer, on_status=display.echo,
                                   on_token=lambda record: display.on_token(bar, record), **options)
    except AudioError as e:
        printer.end()
        display.fail(str(e))
        display.end_file(bar)
        return 1
    if not printer.end():
        display.echo("voxtral-mlx: no speech recognized in stdin")
    failed = _finish_file(display, "-", result, outputs, time.perf_counter() - start)
    display.end_file(bar)
    return failed


def _file_batch(voxtral, names, display, outputs, options) -> int:
    """Transcribe files as one batch, printing each transcript in input order; returns the number of failures."""
    failed, loaded = 0, []
    for name in names:
        try:
            samples = load_audio(name, voxtral.sample_rate)
        except AudioError as e:
            display.fail(str(e))
            display.end_file()
            failed += 1
            continue
        display.status(f"{name}: {samples.size / voxtral.sample_rate:.2f} s of audio")
        loaded.append((name, samples))
    if not loaded:
        return failed
    bars = [display.start_file(name, samples.size / voxtral.sample_rate) for name, samples in loaded]
    start = time.perf_counter()

    def printed(i: int, had_text: bool):
        if not had_text:
            display.echo(f"voxtral-mlx: no speech recognized in {loaded[i][0]}")

    def on_result(i: int, result: Transcription):
        nonlocal failed
        stdout.end(i)
        failed += _finish_file(display, loaded[i][0], result, outputs, time.perf_counter() - start,
                               batch=len(loaded))
        display.end_file(bars[i])

    stdout = _InOrder([display.printer() for _ in loaded], printed)
    voxtral.transcribe([samples for _, samples in loaded], batch_size=len(loaded), on_text=stdout.text,
                       on_token=lambda i, record: display.on_token(bars[i], record), on_result=on_result, **options)
    return failed


def _finish_file(display, name, result, outputs, wall, batch=1) -> int:
    """Write the output files (`outputs`: `write_outputs` but for the result and name, or None)
    and report; returns the number of failures (0 or 1)."""
    failed, label = 0, "stdin" if name == "-" else name
    if outputs is not None:
        try:
            paths = outputs(result, name=_output_name(name))
            display.status(f"{label}: wrote {', '.join(str(p) for p in paths)}")
        except OSError as e:
            display.fail(f"{label}: cannot write the transcript: {e}")
            failed = 1
    shared = f", in a batch of {batch}" if batch > 1 else ""
    display.status(f"{label}: {result.duration:.2f} s of audio, {len(result.tokens)} tokens in {wall:.2f} s "
                   f"({result.duration / wall:.2f}x real time{shared})")
    return failed


class _InOrder:
    """The transcripts of a batch on stdout in input order: the first unfinished one as it is
    decoded, each later one caught up when its turn comes. `printed(i, had_text)` follows each."""

    def __init__(self, printers: list[_Printer], printed):
        self.printers, self.printed = printers, printed
        self.held: list[list[str]] = [[] for _ in printers]
        self.done = [False] * len(printers)
        self.turn = 0

    def text(self, i: int, text: str):
        if i == self.turn:
            self.printers[i](text)
        else:
            self.held[i].append(text)

    def end(self, i: int):
        self.done[i] = True
        while self.turn < len(self.printers) and self.done[self.turn]:
            self.printed(self.turn, self.printers[self.turn].end())
            self.turn += 1
            if self.turn < len(self.printers):
                for text in self.held[self.turn]:
                    self.printers[self.turn](text)
                self.held[self.turn] = []


def _output_formats(output_format: list[OutputFormat] | None, output_dir: Path | None) -> list[str]:
    if not output_format:
        return list(FORMATS) if output_dir is not None else []
    if OutputFormat.all in output_format:
        return list(FORMATS)
    return [f for f in FORMATS if f in {o.value for o in output_format}]


def _output_name(name: str) -> str:
    """Output files are named after the input, as whisper tools do: dir/talk.mp3 -> talk."""
    return "stdin" if name == "-" else Path(name).stem


class _Display:
    """Messages on stderr and, when stderr is a terminal, progress bars: the files being
    decoded (seconds of audio) and, for several inputs, the files done. While the bars are
    up, messages are printed above them, and so is each transcript if stdout is the same
    terminal (stdout going elsewhere gets the text as it is decoded, as without bars)."""

    def __init__(self, n_files: int, verbose: bool, live: bool = False):
        self.n_files, self.verbose, self.done = n_files, verbose, 0
        self.progress = self._overall = None
        self.shared_terminal = False
        if sys.stderr.isatty():
            try:
                self.shared_terminal = sys.stdout.isatty() and os.path.samestat(
                    os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
            except (OSError, ValueError):
                self.shared_terminal = False
        # A live stream's text is its progress: on the terminal of its text, it is printed as it
        # comes, without bars (which would hold it back until the stream ends).
        if sys.stderr.isatty() and not (live and self.shared_terminal):
            from rich.console import Console
            from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn,
                                       TimeRemainingColumn)

            # (the spinner turns while a file's first audio is encoded, before its first token moves the bar)
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                                     TaskProgressColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                     transient=True, redirect_stdout=False, redirect_stderr=False)
            if n_files > 1:
                self._overall = self.progress.add_task(self._files_done(), total=n_files)

    def __enter__(self) -> "_Display":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def _files_done(self) -> str:
        return f"{self.done}/{self.n_files} files"

    def echo(self, message: str):
        if self.progress is None:
            typer.echo(message, err=True)
        else:
            self.progress.console.print(message, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def fail(self, message: str):
        self.echo(f"voxtral-mlx: error: {message}")

    def status(self, message: str):
        if self.verbose:
            self.echo(message)

    def printer(self) -> _Printer:
        if self.progress is not None and self.shared_terminal:
            return _Printer(hold=self.echo)
        return _Printer()

    def start_file(self, name: str, seconds: float | None):
        """A progress bar for a file being decoded (None without bars)."""
        if self.progress is not None:
            return self.progress.add_task(name, total=seconds)
        return None

    def on_token(self, bar, record):
        if bar is not None:
            self.progress.update(bar, completed=record.time)

    def end_file(self, bar=None):
        self.done += 1
        if bar is not None:
            self.progress.remove_task(bar)
        if self._overall is not None:
            # Drawn now, not at the next refresh: files of a batch end within milliseconds.
            self.progress.update(self._overall, completed=self.done, description=self._files_done(), refresh=True)


def _transcribe_stdin(voxtral, interval_ms, printer, on_status=None, **options) -> Transcription:
    """Stream stdin into a session; Ctrl+C or end of input flushes the rest, the audio read ahead
    included (a second Ctrl+C aborts). A live source this machine falls behind is told of once
    through `on_status`."""
    session = voxtral.stream(interval_ms=interval_ms, on_text=printer, **options)
    stop = threading.Event()

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        reader, warned = PipeReader(sys.stdin.buffer, voxtral.sample_rate, STDIN_AHEAD_S), on_status is None
        while True:
            behind = reader.behind_seconds
            chunk = reader.take(timeout=0 if stop.is_set() else 0.1)
            if chunk is None or (stop.is_set() and not chunk.size):
                break
            if not warned and behind > BEHIND_S:
                on_status(f"voxtral-mlx: falling behind real time: {behind:.1f} s of audio were waiting; beyond "
                          f"{STDIN_AHEAD_S:.0f} s a recorder writing into the pipe may drop some (`voxtral-mlx mic` "
                          "keeps the latest audio instead)")
                warned = True
            if chunk.size:
                session.feed(chunk)
            if stop.is_set():  # what was read ahead is fed; the rest of the pipe is not read
                break
        if session.audio_seconds == 0:
            raise AudioError("stdin: no audio received")
        session.finish()
    finally:
        signal.signal(signal.SIGINT, previous)
    return Transcription.from_session(session)


@app.command()
@_interruptible
def mic(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model directory or Hugging Face repo id."),
    device: Optional[str] = typer.Option(None, "--device", help="Input device: index or (part of) its name "
                                                                "(default: the system's default input)."),
    list_devices: bool = typer.Option(False, "--list-devices", help="List input devices and exit."),
    delay_ms: Optional[int] = typer.Option(None, "--delay-ms", "-d",
                                           help="Transcription delay: 80..1200 in steps of 80, or 2400 "
                                                "(default: from the model, 480)."),
    interval: Optional[float] = typer.Option(None, "--interval", callback=_finite("seconds", zero=True),
                                             help="Seconds of new audio between model runs "
                                                  "(default: every 80 ms token)."),
    vad: bool = typer.Option(True, "--vad/--no-vad", help="Skip long silences (after flushing the utterance)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the transcript to this file."),
    duration: Optional[float] = typer.Option(None, "--duration", callback=_finite("seconds"),
                                             help="Stop after this many seconds."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32, bfloat16 or float16."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Status and timings on stderr."),
):
    """Live captions from a microphone; Ctrl+C stops and prints what was still being decoded."""
    from .mic import MicError, Microphone, input_device, list_input_devices, transcribe_live

    device_id = int(device) if device is not None and device.isdigit() else device
    out = None
    try:
        if list_devices:
            devices = list_input_devices()
            if not devices:
                raise MicError("no input devices found: is a microphone connected, and can PortAudio see it "
                               "(on Linux: arecord -l)?")
            for d in devices:
                typer.echo(f"{'*' if d['default'] else ' '} {d['index']:3d}  {d['name']}  "
                           f"({d['channels']} ch, {d['default_samplerate']:.0f} Hz)")
            return
        input_device(device_id)  # before the model loads (or downloads) on a machine without one
        path = _check_model(model, delay_ms)
        if output is not None:
            _check_writable(output)
    except (MicError, *USER_ERRORS) as e:
        _fail(str(e))
        raise typer.Exit(1)
    stop = threading.Event()

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    printer, stats, failed = _Printer(), {}, False
    written = None
    try:
        voxtral = _load(path, dtype, verbose)
        voxtral.prepare(delay_ms)  # before the microphone opens: the first words are not late by it
        with Microphone(device_id, duration=duration) as source:
            _status(verbose, f"listening on {source.name!r} at {source.rate} Hz; Ctrl+C to stop")
            if output is not None:  # replaced only now that there is something to write
                out = open(output, "w", encoding="utf-8")
                written = _Printer(stream=out)
            previous = signal.signal(signal.SIGINT, on_sigint)
            try:
                for text in transcribe_live(voxtral, source, delay_ms=delay_ms,
                                            interval_ms=None if interval is None else interval * 1000,
                                            vad=vad, stop=stop, stats=stats,
                                            on_status=lambda m: typer.echo(f"voxtral-mlx: {m}", err=True)):
                    printer(text)
                    if written is not None:
                        written(text)
            finally:
                signal.signal(signal.SIGINT, previous)
    except (MicError, *USER_ERRORS) as e:
        failed = True
        printer.end()
        _fail(str(e))
    finally:
        if out is not None:
            written.end()
            out.close()
    if not failed:
        printer.end()
    if stats:
        _status(verbose, f"heard {stats['heard']:.1f} s, transcribed {stats['fed']:.1f} s "
                         f"(silence skipped {stats['skipped']:.1f} s, dropped behind real time "
                         f"{stats['dropped']:.1f} s)")
    if failed:
        raise typer.Exit(1)


@app.command()
@_interruptible
def convert(
    src: str = typer.Argument(..., help="Model directory (any supported layout) or Hugging Face repo id."),
    out: Path = typer.Argument(..., help="Directory to write the converted model to."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Dtype of float weights and quantization scales: "
                                                          "bfloat16, float16 or float32."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Quantize the linear layers and the tied "
                                                                "embedding to 4, 6 or 8 bits [default: no quantization]."),
    q_group_size: Optional[int] = typer.Option(None, "--q-group-size", help="Weights per quantization scale, with "
                                                                            "--q-bits: 32, 64 or 128 [default: 64]."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it holds a model written by this command."),
):
    """Convert a model to the voxtral-mlx layout (cast or quantized), which --model and load() read directly."""
    from .convert import convert as convert_model

    if q_group_size is not None and q_bits is None:
        _fail("--q-group-size applies to quantized models: add --q-bits 4, 6 or 8")
        raise typer.Exit(2)
    previous = signal.signal(signal.SIGTERM, _terminate)  # cleaned up as after Ctrl+C
    try:
        result = convert_model(src, out, dtype=dtype, q_bits=q_bits, q_group_size=q_group_size or 64, force=force)
    except USER_ERRORS as e:
        message = str(e)
        for option in ("q_bits", "q_group_size"):
            if message.startswith(option + " "):
                message = "--" + option.replace("_", "-") + message[len(option):].split(" (or None")[0]
        _fail(message)
        raise typer.Exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.bits is None:
        kind = result.dtype
    else:
        kind = (f"{result.bits}-bit, group size {result.group_size}, on {len(result.quantized)} layers "
                f"(scales and other weights {result.dtype})")
    size = result.file_bytes
    size_text = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
    files = "1 file" if len(result.files) == 1 else f"{len(result.files)} shards"
    n = result.parameters
    params = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"
    typer.echo(f"converted {src} ({result.source_layout} layout) to {result.path}: {kind}; {size_text} in {files}, "
               f"{result.bits_per_weight:.2f} bits per weight, {params} parameters, {result.seconds:.1f} s")


@app.command()
@_interruptible
def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model directory or Hugging Face repo id."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on (default: this machine only; 0.0.0.0 for every "
                                  "interface, with --api-key)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="TCP port (0: any free port)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="VOXTRAL_MLX_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every request "
                                               "(or set VOXTRAL_MLX_API_KEY)."),
    delay_ms: Optional[int] = typer.Option(None, "--delay-ms", "-d",
                                           help="Default transcription delay: 80..1200 in steps of 80, or 2400 "
                                                "(default: from the model, 480); requests may choose another."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32, bfloat16 or float16."),
    max_sessions: int = typer.Option(4, "--max-sessions", min=1,
                                     help="WebSocket sessions plus transcription requests served at once."),
    max_upload_mb: float = typer.Option(100.0, "--max-upload-mb", min=0.001, help="Largest uploaded file, in MB."),
    max_audio_minutes: float = typer.Option(240.0, "--max-audio-minutes", min=0.01,
                                            help="Longest audio of one upload or one WebSocket stream."),
    max_rate: float = typer.Option(10.0, "--max-rate", min=0.01,
                                   help="A WebSocket stream may send audio this many times faster than real "
                                        "time (after a 30 s head start)."),
    allow_origin: List[str] = typer.Option([], "--allow-origin",
                                           help="A web origin (https://app.example) whose browser pages may "
                                                "call the server, besides localhost's; repeatable; * for any."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="The load and every request on stderr."),
):
    """Serve the model over HTTP: OpenAI's /v1/audio/transcriptions and the realtime WebSocket /v1/realtime.

    One model is loaded and shared; sessions are served in turns. Ctrl+C stops the server.
    """
    missing = _missing_server_extras()
    if not missing:
        from .server import ServerLimits
        from .server import serve as run_server
    if missing:
        _fail(f"the server needs {', '.join(missing)}: pip install 'voxtral-mlx[server]'")
        raise typer.Exit(1)
    try:
        limits = ServerLimits(max_sessions=max_sessions, max_upload_mb=max_upload_mb,
                              max_audio_s=max_audio_minutes * 60, max_rate=max_rate)
        path = _check_model(model, delay_ms)
        voxtral = _load(path, dtype, verbose)
    except USER_ERRORS as e:
        _fail(str(e))
        raise typer.Exit(1)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"voxtral-mlx: warning: listening on {host} without --api-key: anyone who can reach this "
                   "port can use the server", err=True)
    try:
        # A local model is listed by its directory's name, not its path on this machine.
        model_id = path.absolute().name if Path(model).expanduser().is_dir() else model
        run_server(voxtral, host=host, port=port, api_key=api_key, limits=limits, model_id=model_id,
                   delay_ms=delay_ms, log_level="info" if verbose else "warning", allow_origins=tuple(allow_origin),
                   on_listening=lambda url: typer.echo(f"voxtral-mlx: serving {model} on {url} "
                                                       "(Ctrl+C to stop)", err=True))
    except OSError as e:
        _fail(str(e))
        raise typer.Exit(1)
    except KeyboardInterrupt:  # the server has shut down; Ctrl+C is how it is meant to end
        pass
    typer.echo("voxtral-mlx: server stopped", err=True)


def _missing_server_extras() -> list[str]:
    """Packages of the `server` extra that are not installed (found without importing them)."""
    import importlib.util

    modules = {"starlette": "starlette", "uvicorn": "uvicorn", "websockets": "websockets",
               "python_multipart": "python-multipart"}
    missing = []
    for module, package in modules.items():
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(package)
        except ValueError:  # a module set to None in sys.modules
            missing.append(package)
    return missing


def main():
    app(prog_name="voxtral-mlx")  # the same name under `python -m voxtral_mlx`


if __name__ == "__main__":
    main()
