"""The `voxtral-mlx` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .audio import AudioError, load_audio
from .config import ConfigError
from .weights import DEFAULT_MODEL, ModelNotFoundError, WeightsError, load, load_config, resolve_model

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Voxtral Realtime speech-to-text with MLX.")

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


@app.command()
def transcribe(
    files: List[str] = typer.Argument(..., help="Audio files (WAV, FLAC, OGG, MP3; others need ffmpeg)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="Model directory or Hugging Face repo id."),
    delay_ms: Optional[int] = typer.Option(None, "--delay-ms", "-d",
                                           help="Transcription delay: 80..1200 in steps of 80, or 2400 "
                                                "[default: from the model, 480]."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
                                        help="Compute dtype: float32, bfloat16 or float16 "
                                             "[default: float32 on CPU, bfloat16 on GPU]."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Status and timings on stderr."),
):
    """Transcribe audio files; each transcript is printed as it is decoded."""
    paths = []
    failed = 0
    for name in files:
        if not Path(name).exists():
            _fail(f"{name}: no such file")
            failed += 1
        else:
            paths.append(name)
    if not paths:
        raise typer.Exit(1)
    try:
        start = time.perf_counter()
        path = resolve_model(model)
        _, _, audio_args = load_config(path)
        audio_args.delay_tokens(delay_ms)
        voxtral = load(path, dtype=dtype)
        _status(verbose, f"loaded {path} ({voxtral.dtype}) in {time.perf_counter() - start:.1f} s")
    except USER_ERRORS as e:
        _fail(str(e))
        raise typer.Exit(1)
    for name in paths:
        try:
            samples = load_audio(name, voxtral.sample_rate)
            _status(verbose, f"{name}: {samples.size / voxtral.sample_rate:.2f} s of audio")
            start = time.perf_counter()
            printer = _Printer()
            result = voxtral.transcribe(samples, delay_ms=delay_ms, on_text=printer)
        except AudioError as e:
            _fail(str(e))
            failed += 1
            continue
        if printer.started:
            sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            typer.echo(f"voxtral-mlx: no speech recognized in {name}", err=True)
        wall = time.perf_counter() - start
        _status(verbose, f"{name}: {len(result.tokens)} tokens in {wall:.2f} s "
                         f"({result.duration / wall:.2f}x real time, delay {result.delay_ms} ms)")
    if failed:
        raise typer.Exit(1)


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("\nvoxtral-mlx: interrupted\n")
        sys.exit(130)
