"""A fast BLAS for MLX's CPU matmuls on Linux, loaded before MLX itself.

The `mlx[cpu]` wheel links a reference BLAS: correct, single-threaded and slow (a decoder step
of the 4B model reads 13.6 GB of float32 weights at about 3 GB/s). A BLAS loaded into the
global symbol scope before MLX serves MLX's `cblas_sgemm` calls instead: Intel MKL (the `mkl`
extra; one-row products stream the weights from memory at about 26 GB/s on a 2-core Xeon,
the most that machine delivers) or the system's OpenBLAS (about 10 GB/s: it repacks the
weight for a one-row product). `VOXTRAL_MLX_BLAS` chooses:
`auto` (default: MKL, else OpenBLAS), `mkl`, `openblas`, or `builtin` to keep the wheel's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: str | None = None
reason = "not Linux" if sys.platform != "linux" else "no MKL or OpenBLAS found"


def _candidates(choice: str) -> list[str]:
    paths: list[str] = []
    if choice in ("auto", "mkl"):
        paths += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
        found = ctypes.util.find_library("mkl_rt")
        paths += [found] if found else []
    if choice in ("auto", "openblas"):
        paths += [p for p in OPENBLAS_PATHS if os.path.exists(p)]
        found = ctypes.util.find_library("openblas")
        paths += [found] if found else []
    return paths


def preload() -> str | None:
    """Load the chosen BLAS with RTLD_GLOBAL unless MLX is already loaded; returns its path."""
    global loaded, reason
    if loaded is not None or sys.platform != "linux":
        return loaded
    choice = os.environ.get("VOXTRAL_MLX_BLAS", "auto").strip().lower()
    if choice in ("builtin", "none", "off", "0"):
        reason = f"VOXTRAL_MLX_BLAS={choice}"
        return None
    if "mlx.core" in sys.modules:
        reason = "mlx was imported before voxtral_mlx"
        return None
    for path in _candidates(choice):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        return path
    return None
