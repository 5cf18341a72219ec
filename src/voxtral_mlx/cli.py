"""The `voxtral-mlx` command line."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import typer

from . import __version__
from .audio import AudioError, load_audio, read_pcm_stream
from .config import ConfigError
from .weights import (DEFAULT_MODEL, ModelNotFoundError, WeightsError, blas_backend, load, load_config,
                      resolve_model)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Voxtral Realtime speech-to-text with MLX.")

OPENBLAS_HINT = ("; on Linux, preloading OpenBLAS makes them several times faster: "
                 "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 (Debian/Ubuntu package "
                 "libopenblas0-pthread)")
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
    """Writes text to stdout as it arrives, without the transcript's leading space."""

    def __init__(self):
        self.started = False

    def __call__(self, text: str):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def end(self) -> bool:
        """End the transcript's line; whether it had any text."""
        if self.started:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return self.started


@app.command()
def transcribe(
    files: List[str] = typer.Argument(..., help="Audio files (WAV, FLAC, OGG, MP3; others need ffmpeg), "
                                                  "or - to stream raw s16le 16 kHz mono or WAV from stdin."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="Model directory or Hugging Face repo id."),
    delay_ms: Optional[int] = typer.Option(None, "--delay-ms", "-d",
                                           help="Transcription delay: 80..1200 in steps of 80, or 2400 "
                                                "[default: from the model, 480]."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
                                        help="Compute dtype: float32, bfloat16 or float16 "
                                             "[default: float32 on CPU, bfloat16 on GPU]."),
    interval_ms: Optional[float] = typer.Option(None, "--interval-ms",
                                                help="With -: run the model once this much audio has "
                                                     "arrived (higher = more throughput, more latency) "
                                                     "[default: every 80 ms token]."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Status and timings on stderr."),
):
    """Transcribe audio files or a live stream; text is printed as it is decoded."""
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
    if not inputs:
        raise typer.Exit(1)
    try:
        start = time.perf_counter()
        path = resolve_model(model)
        _, _, audio_args = load_config(path)
        try:
            audio_args.delay_tokens(delay_ms)
        except ValueError as e:
            raise ValueError(f"--delay-ms: {e}") from None
        voxtral = load(path, dtype=dtype)
        _status(verbose, f"loaded {path} ({str(voxtral.dtype).rsplit('.', 1)[-1]}) in "
                         f"{time.perf_counter() - start:.1f} s on the {'GPU' if mx.default_device() == mx.gpu else 'CPU'}")
        if mx.default_device() == mx.cpu:
            _status(verbose, f"CPU matmuls: {blas_backend()}" + (OPENBLAS_HINT if "reference" in blas_backend() else ""))
    except USER_ERRORS as e:
        _fail(str(e))
        raise typer.Exit(1)
    for name in inputs:
        printer = _Printer()
        start = time.perf_counter()
        try:
            if name == "-":
                tokens, seconds = _transcribe_stdin(voxtral, delay_ms, interval_ms, printer)
            else:
                samples = load_audio(name, voxtral.sample_rate)
                _status(verbose, f"{name}: {samples.size / voxtral.sample_rate:.2f} s of audio")
                result = voxtral.transcribe(samples, delay_ms=delay_ms, on_text=printer)
                tokens, seconds = len(result.tokens), result.duration
        except AudioError as e:
            printer.end()
            _fail(str(e))
            failed += 1
            continue
        if not printer.end():
            typer.echo(f"voxtral-mlx: no speech recognized in {'stdin' if name == '-' else name}", err=True)
        wall = time.perf_counter() - start
        _status(verbose, f"{name}: {seconds:.2f} s of audio, {tokens} tokens in {wall:.2f} s "
                         f"({seconds / wall:.2f}x real time)")
    if failed:
        raise typer.Exit(1)


def _transcribe_stdin(voxtral, delay_ms, interval_ms, printer) -> tuple[int, float]:
    """Stream stdin into a session; Ctrl+C or end of input flushes the rest (a second Ctrl+C aborts)."""
    session = voxtral.stream(delay_ms=delay_ms, interval_ms=interval_ms, on_text=printer)
    state = {"reading": False, "stop": False}

    def on_sigint(signum, frame):
        if state["reading"] or state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        chunks = read_pcm_stream(sys.stdin.buffer)
        while not state["stop"]:
            state["reading"] = True
            try:
                chunk = next(chunks, None)
            except KeyboardInterrupt:
                state["stop"] = True
                break
            finally:
                state["reading"] = False
            if chunk is None:
                break
            session.feed(chunk)
        if session.audio_seconds == 0:
            raise AudioError("stdin: no audio received")
        session.finish()
    finally:
        signal.signal(signal.SIGINT, previous)
    return len(session.tokens), session.audio_seconds


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("\nvoxtral-mlx: interrupted\n")
        sys.exit(130)
