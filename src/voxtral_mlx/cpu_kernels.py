"""The AMX kernel for bfloat16 products of a few rows on x86-64 Linux (`kernels/bf16_rows.c`).

A decoder step multiplies one row per stream by every weight; MKL's bfloat16 GEMM runs at
half its one-row speed from two rows on, so a batch of four files or a speculative pass of
eight positions cost twice a single step. The kernel reads each weight once for up to 16
rows (twice for 17 to 32) at the speed of memory, and gives every row the same bits
whatever rows, and however many threads, are around it.

It is compiled on first use with the system C compiler (`CC`, else cc, gcc or clang) into
the user cache (`$XDG_CACHE_HOME/voxtral-mlx`, else ~/.cache/voxtral-mlx), one library per
source and compiler, and used where the CPU has AMX (Sapphire Rapids and later Xeons). When
it cannot be (another CPU, no compiler, `VOXTRAL_MLX_CPU_KERNELS=off`), `reason` says why
and MKL multiplies every product, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from .kernels import kernel_source

ENV = "VOXTRAL_MLX_CPU_KERNELS"
SOURCE = "bf16_rows.c"
MAX_ROWS = 32  # beyond this (the encoder's frames), MKL's GEMM is the faster one
CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16")
FLAGS = ("-O2", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16", "-fPIC", "-shared", "-pthread")

reason: str | None = None  # why the kernel is not used, once `library()` has looked


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "voxtral-mlx"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiler() -> str | None:
    for name in [os.environ.get("CC"), "cc", "gcc", "clang"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(cc: str, source: str, target_dir: Path) -> Path:
    """Compile `source` with `cc` into `target_dir` (kept there; another process building the
    same library at the same time is harmless). Raises RuntimeError with the compiler's words."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([source, cc, version, *FLAGS]).encode()).hexdigest()[:16]
    target = target_dir / f"bf16_rows-{key}.so"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        src, out = Path(tmp) / SOURCE, Path(tmp) / target.name
        src.write_text(source)
        done = subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            words = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{Path(cc).name} could not build {SOURCE}: {words[-1] if words else done.returncode}")
        os.replace(out, target)
    return target


def _load():
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, "not x86-64 Linux"
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("off", "0", "no", "false"):
        return None, f"{ENV}={mode}"
    if mode not in ("auto", "on", "1", "yes", "true"):
        return None, f"{ENV}={mode} is not auto or off"
    missing = [f for f in CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler (set CC, or install gcc or clang)"
    try:
        lib = ctypes.CDLL(str(build(cc, kernel_source(SOURCE), cache_dir())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, str(e)
    if lib.bf16_rows_init() != 0:
        return None, "Linux refused the AMX tile state (arch_prctl)"
    fn = lib.bf16_rows
    p, n = ctypes.c_void_p, ctypes.c_long
    fn.argtypes = [p, p, p, n, n, n, ctypes.c_int, p]
    fn.restype = ctypes.c_int
    return fn, None


@lru_cache(maxsize=None)
def library():
    """The kernel's entry point, built and loaded once; None (and `reason`) where it cannot be."""
    global reason
    fn, reason = _load()
    return fn


@lru_cache(maxsize=None)
def threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fits(rows: int, n: int, k: int) -> bool:
    """Whether a product of `rows` rows with an n x k weight goes through the kernel."""
    return rows <= MAX_ROWS and n % 32 == 0 and k % 32 == 0 and library() is not None


def rows_t(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`bf16(x) @ w.T` in float32 for x [M, K] float32 and w [N, K] bfloat16 bits (uint16)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    (m, k), n = x.shape, w.shape[0]
    if w.shape[1] != k or w.dtype != np.uint16 or not w.flags.c_contiguous:
        raise ValueError(f"rows_t needs a contiguous uint16 weight with {k} columns, got {w.dtype} {w.shape}")
    if not fits(m, n, k):
        raise ValueError(f"rows_t takes at most {MAX_ROWS} rows and multiples of 32 ({m} x {k} by {n} x {k})"
                         if library() is not None else f"the bfloat16 row kernel is not available: {reason}")
    out = np.empty((m, n), np.float32)
    scratch = np.empty(m * k, np.uint16)
    library()(x.ctypes.data, w.ctypes.data, out.ctypes.data, m, n, k, threads(), scratch.ctypes.data)
    return out
