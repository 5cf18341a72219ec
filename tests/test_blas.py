"""The BLAS that serves MLX's CPU matmuls: chosen at import, reported, and overridable."""

import subprocess
import sys

import pytest

PROBE = "import voxtral_mlx; from voxtral_mlx.weights import blas_backend; print(blas_backend())"

linux = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS preload is for Linux (macOS has Accelerate)")


def backend(choice: str | None, code: str = PROBE) -> str:
    env = None
    if choice is not None:
        import os

        env = dict(os.environ, VOXTRAL_MLX_BLAS=choice)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@linux
def test_mkl_is_loaded_when_installed():
    # The dev extra installs MKL on x86-64 Linux.
    assert backend(None).endswith(("libmkl_rt.so.2", "libmkl_rt.so.3"))
    assert backend("mkl") == backend(None)


@linux
def test_builtin_keeps_the_wheels_blas():
    assert backend("builtin") == "reference BLAS of the mlx-cpu wheel (VOXTRAL_MLX_BLAS=builtin)"


@linux
def test_too_late_once_mlx_is_loaded():
    got = backend(None, "import mlx.core; " + PROBE)
    assert got == "reference BLAS of the mlx-cpu wheel (mlx was imported before voxtral_mlx)"


@linux
def test_same_tokens_whatever_the_blas(tiny_dir):
    code = ("import sys, numpy as np, voxtral_mlx; sys.path.insert(0, 'tests'); from conftest import speech; "
            f"print(voxtral_mlx.load({str(tiny_dir)!r}).transcribe(speech('night1968_5s')).tokens)")
    assert backend("builtin", code) == backend("mkl", code)
