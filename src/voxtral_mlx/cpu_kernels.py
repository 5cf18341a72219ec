"""Kernels for products of float32 rows on x86-64 Linux CPUs (`kernels/cpu_rows.c`).

- `rows_t` (AMX): bfloat16 weights, up to 32 rows. A decoder step multiplies one row per
  stream by every weight; MKL's bfloat16 GEMM runs at half its one-row speed from two rows
  on, so a batch of four files or a speculative pass of eight positions cost twice a single
  step. This kernel reads each weight once for up to 16 rows (twice for 17 to 32) at the
  speed of memory. x is rounded to bfloat16, or taken in three bfloat16 parts (`bf16_split`)
  for float32 products: 5 rows a pass, one row 1.7x MKL's float32 GEMM of the widened
  weights (half the bytes), four rows 4x. Without AMX (any CPU with AVX-512), the same
  products through `wide_rows`: the weights widened to float32 in registers (exact) and
  multiplied by x (rounded to bfloat16, or as it is for float32 products) with FMA; on a Zen 4,
  one row 3x MKL's float32 GEMM of the widened weights, four rows about 1.4x one, and many
  rows (`wide_t`: prompts, encoder chunks) at 80-100 GMAC/s, as fast as MKL's GEMM or faster.
- `q_rows_t` (AVX-512): 4- and 8-bit weights as MLX quantizes them (affine, a float32 scale
  and bias per group), any number of rows. MLX's CPU quantized product is a scalar loop
  (3 s per decoder step of the 4B model); this one streams the packed weights and widens
  them to float32 in registers, one multiply-add per row and value (for CPUs without AMX or
  VNNI, and groups of 32). More rows than MAX_ROWS: blocks of the weight dequantized
  (`q_dequantize`) and multiplied by `f32_rows`, the passes of `wide_rows` over float32
  weights (`blocks_gemm`).
- `q_packed_t` (AMX, else AVX-512 VNNI): the same products (groups of 64 or 128) for any
  number of rows, over weights stored once for it (`q_pack`: the same bytes in the order AMX
  reads them), as exact 8-bit integer products: x split into three 8-bit parts per group (21
  bits below the group's largest value: its error is below that of float32's sums; four, 28
  bits, on request), q times each summed exactly in int32, then scaled in float32 (scales and
  biases float32, or bfloat16 bits: `QPacked.halved`). AMX: up to five rows share each
  instruction; one row 1.3x `q_rows_t`'s speed at 4 bits (1.1x at 8), four rows 2.4-2.6x; the
  prompt about twice MKL's float32 GEMM of the dequantized weights. VNNI (`q_vnni`: Zen 4, Ice
  Lake and Cascade Lake Xeons): the same numbers, 64 products an instruction; on a Zen 4, one
  row at 4 bits 1.4-1.8x `q_rows_t`'s speed (the memory's), four rows 1.7x, many rows
  1.2-1.3x `f32_rows` over dequantized blocks.

All give every row the same bits whatever rows, and however many threads, are around it.
The source is compiled on first use with the system C compiler (`CC`, else cc, gcc or clang)
into the user cache (`$XDG_CACHE_HOME/voxtral-mlx`, else ~/.cache/voxtral-mlx), one library
per source and compiler. The library needs AVX-512 (Skylake-SP and later Xeons, Zen 4 and
later); the AMX kernels AMX as well (Sapphire Rapids and later Xeons). Where they cannot
be used (another CPU, no compiler, `VOXTRAL_MLX_CPU_KERNELS=off`), `reason`, `amx_reason` and
`packed_reason` say why, and MKL and MLX multiply as before.
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
import threading
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .kernels import kernel_source

ENV = "VOXTRAL_MLX_CPU_KERNELS"
SOURCE = "cpu_rows.c"
# Rows the row kernels take; more (prompts, encoder chunks) go to other kernels or MKL, which
# `host` gives a stream at a time unless a row's bits do not depend on them (`q_packed_t`), and
# a batch holds at most this many files.
MAX_ROWS = 32
CPU_FLAGS = ("avx512f",)  # the library, and the quantized kernel
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512bw")  # bf16_rows and q_amx
Q_BITS = (4, 8)
Q_GROUPS = (32, 64, 128)  # MLX's group sizes; the kernel finds a value's group by a shift
VNNI_FLAGS = ("avx512_vnni", "avx512bw")  # q_vnni (q_packed_t without AMX)
Q_PACKED_GROUPS = (64, 128)  # q_packed_t takes a group as whole chunks of 64 values
FLAGS = ("-O2", "-ffp-contract=off", "-mamx-tile", "-mamx-bf16", "-mamx-int8", "-mavx512f", "-mavx512bw",
         "-mavx512bf16", "-mavx512vnni", "-fPIC", "-shared", "-pthread")

reason: str | None = None  # why the kernels are not used, once `library()` has looked
amx_reason: str | None = None  # why the AMX kernels are not, once `amx()` has looked
packed_reason: str | None = None  # why `q_packed_t` cannot multiply, once `packed_kernel()` has looked


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


@lru_cache(maxsize=None)
def _version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout


def _target(cc: str, source: str, target_dir: Path) -> Path:
    """Where `build` keeps the library of `source` built by `cc` (named by both, and the flags)."""
    version = _version(cc)
    key = hashlib.sha256("\0".join([source, cc, version, *FLAGS]).encode()).hexdigest()[:16]
    return target_dir / f"{Path(SOURCE).stem}-{key}.so"


def build(cc: str, source: str, target_dir: Path) -> Path:
    """Compile `source` with `cc` into `target_dir` (kept there; another process building the
    same library at the same time is harmless). Raises RuntimeError with the compiler's words."""
    target = _target(cc, source, target_dir)
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


def _usable() -> tuple[str | None, str | None]:
    """The C compiler to build the kernels with, or None and why they cannot be used here."""
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
    return cc, None


def needs_build() -> bool:
    """Whether `library()` will compile the kernels first (once per machine and version: several
    seconds), for a message before it."""
    cc, _ = _usable()
    try:
        return cc is not None and not _target(cc, kernel_source(SOURCE), cache_dir()).exists()
    except (OSError, subprocess.SubprocessError):
        return False


def _load():
    cc, why = _usable()
    if cc is None:
        return None, why
    try:
        lib = ctypes.CDLL(str(build(cc, kernel_source(SOURCE), cache_dir())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, str(e)
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.bf16_rows.argtypes = [p, p, p, n, n, n, i, p, i]
    lib.bf16_split.argtypes = [p, p, n, n, i]
    lib.wide_rows.argtypes = [p, p, p, n, n, n, i, p, i]
    lib.dot_rows.argtypes = [p, p, p, n, n, n, i, p]
    lib.f32_rows.argtypes = [p, p, p, n, n, n, n, i]
    lib.bf16_widen.argtypes = [p, p, n, n, i]
    lib.q_rows.argtypes = [p, p, p, p, p, n, n, n, i, i, i, p]
    lib.q_amx.argtypes = [p, p, p, p, p, n, n, n, i, i, i, i, i]
    lib.q_vnni.argtypes = [p, p, p, p, p, n, n, n, i, i, i, i, i]
    lib.q_dequantize.argtypes = [p, p, p, p, n, n, i, i, i]
    lib.q_pack.argtypes = [p, p, p, p, p, p, n, n, i, i, i]
    lib.attend.argtypes = [p, p, p, p, n, i, n, n, n, ctypes.c_float, p, i, p, i]
    lib.attend_many.argtypes = [p, p, p, p, n, n, n, n, n, ctypes.c_float, p, i, i]
    lib.silu_mul.argtypes = [p, p, p, n, i]
    lib.rope_heads.argtypes = [p, p, p, p, n, n, n, n, i]
    lib.rms_norm.argtypes = [p, p, p, p, n, n, ctypes.c_float, i]
    lib.layer_step.argtypes = [ctypes.POINTER(StepLayer), p, n, n, p, p, p, p, p, n, n, n, n, p, ctypes.c_float, p,
                               i, i]
    lib.layer_step_work.argtypes = [ctypes.POINTER(StepLayer), n, n]
    lib.layer_step_work.restype = n
    for fn in (lib.bf16_rows, lib.bf16_split, lib.wide_rows, lib.dot_rows, lib.f32_rows, lib.bf16_widen, lib.q_rows,
               lib.q_amx, lib.q_vnni, lib.q_pack, lib.q_dequantize, lib.attend, lib.attend_many, lib.silu_mul,
               lib.rope_heads, lib.rms_norm, lib.layer_step, lib.bf16_rows_init):
        fn.restype = i
    return lib, None


@lru_cache(maxsize=None)
def library():
    """The compiled kernels (ctypes), built and loaded once; None (and `reason`) where they cannot be."""
    global reason
    lib, reason = _load()
    return lib


@lru_cache(maxsize=None)
def amx() -> bool:
    """Whether the AMX kernels (bfloat16, quantized) can run here (else `amx_reason` says why)."""
    global amx_reason
    missing = [f for f in AMX_FLAGS if f not in cpu_flags()]
    if library() is None:
        amx_reason = reason
    elif missing:
        amx_reason = f"the CPU lacks {', '.join(missing)}"
    elif library().bf16_rows_init() != 0:
        amx_reason = "Linux refused the AMX tile state (arch_prctl)"
    else:
        amx_reason = None
    return amx_reason is None


@lru_cache(maxsize=None)
def packed_kernel() -> str | None:
    """Which kernel multiplies quantized weights stored by `q_pack` here (`q_packed_t`): "AMX",
    "VNNI" (AVX-512 VNNI, CPUs without AMX), or None (`packed_reason` says why)."""
    global packed_reason
    missing = [f for f in VNNI_FLAGS if f not in cpu_flags()]
    packed_reason = None
    if amx():
        return "AMX"
    if library() is None:
        packed_reason = reason
    elif missing:
        packed_reason = f"neither AMX nor AVX-512 VNNI ({amx_reason}; the CPU lacks {', '.join(missing)})"
    return None if packed_reason else "VNNI"


@lru_cache(maxsize=None)
def threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_local = threading.local()


def scratch(size: int) -> np.ndarray:
    """A float32 buffer of `size` values kept per thread for the kernels' temporaries: Linux zeroes
    fresh pages on first touch, which for new 32 MB blocks cost about 0.6 s per prompt."""
    if getattr(_local, "scratch", np.empty(0, np.float32)).size < size:
        _local.scratch = np.empty(size, np.float32)
    return _local.scratch[:size]


SMALL = 1 << 18  # multiply-adds below which a call runs on the caller alone (tens of microseconds)


def threads_for(work: int) -> int:
    """Threads for a call of `work` multiply-adds: waking a worker costs more than a small one."""
    return 1 if work < SMALL else threads()


def fits(rows: int, n: int, k: int) -> bool:
    """Whether a product of `rows` rows with an n x k bfloat16 weight goes through a row kernel
    (`rows_t`: AMX's, else the AVX-512 one)."""
    return rows <= MAX_ROWS and shapes_fit(n, k)


def shapes_fit(n: int, k: int) -> bool:
    """Whether the row kernels take a weight of n x k (whole multiples of 32): for any number of
    rows, `wide_t` (bfloat16 weights, CPUs without AMX) and `blocks_gemm(kernel=True)`."""
    return n % 32 == 0 and k % 32 == 0 and library() is not None


def row_kernel() -> str | None:
    """Which kernel multiplies bfloat16 weights by a few rows here (`rows_t`): "AMX", "AVX-512"
    (CPUs without AMX: Zen 4, Skylake-SP to Ice Lake Xeons), or None (`reason` says why)."""
    return None if library() is None else "AMX" if amx() else "AVX-512"


def result(out: np.ndarray | None, m: int, n: int) -> np.ndarray:
    """Where a product of m x n goes: `out` (checked: C-contiguous float32 [m, n]), or a new array."""
    if out is None:
        return np.empty((m, n), np.float32)
    if out.shape != (m, n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(m, n)}, "
                         f"got {out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' (strided)'}")
    return out


def rows_t(x: np.ndarray, w: np.ndarray, parts: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """`x @ w.T` in float32 for x [M, K] float32 and w [N, K] bfloat16 bits (uint16), with x
    rounded to bfloat16 (parts=1) or in three bfloat16 parts (parts=3: float32 precision);
    written into `out` [M, N] where given (see `result`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    (m, k), n = x.shape, w.shape[0]
    if w.shape[1] != k or w.dtype != np.uint16 or not w.flags.c_contiguous:
        raise ValueError(f"rows_t needs a contiguous uint16 weight with {k} columns, got {w.dtype} {w.shape}")
    if not fits(m, n, k):
        raise ValueError(f"rows_t takes at most {MAX_ROWS} rows and multiples of 32 ({m} x {k} by {n} x {k})"
                         if library() is not None else f"the bfloat16 row kernel is not available: {reason}")
    out = result(out, m, n)
    if amx():
        pairs = np.empty(parts * m * k, np.uint16)
        done = library().bf16_rows(x.ctypes.data, w.ctypes.data, out.ctypes.data, m, n, k,
                                   threads_for(parts * m * n * k), pairs.ctypes.data, parts)
    else:
        done = _wide_rows(x, w, parts, out)
    if not done:
        raise ValueError(f"rows_t takes x in 1 or 3 parts, not {parts}")
    return out


def _wide_rows(x: np.ndarray, w: np.ndarray, parts: int, out: np.ndarray) -> int:
    """`wide_rows` (x's values rounded or as they are, times the weights widened in registers)
    on checked arguments, or for x rounded to bfloat16 on a CPU with AVX-512 BF16, `dot_rows`
    (pairs of bfloat16 products by VDPBF16PS: 1.5-1.7x for many rows); 0 for parts other than
    1 or 3."""
    (m, k), n = x.shape, w.shape[0]
    rows = scratch(m * k)  # x reordered: pages touched once, not per call
    if parts == 1 and dot_bf16():
        return library().dot_rows(x.ctypes.data, w.ctypes.data, out.ctypes.data, m, n, k, threads_for(m * n * k),
                                  rows.ctypes.data)
    return library().wide_rows(x.ctypes.data, w.ctypes.data, out.ctypes.data, m, n, k, threads_for(m * n * k),
                               rows.ctypes.data, parts)


@lru_cache(maxsize=None)
def dot_bf16() -> bool:
    """Whether the CPU has AVX-512 BF16 (VDPBF16PS) for `dot_rows`."""
    return "avx512_bf16" in cpu_flags()


WIDENED = 1 << 23  # float32 weight values widened at a time for MKL's GEMM of many rows (32 MB)
DEQUANTIZED = 1 << 20  # values a block for `f32_rows` (4 MB: in the last-level cache while x passes)


def blocks_gemm(x: np.ndarray, n: int, widen, out: np.ndarray | None = None, kernel: bool = False) -> np.ndarray:
    """`x @ W.T` [M, n] for float32 rows x [M, K] (C-contiguous, many of them) and a weight W
    [n, K] stored narrower: `widen(n0, n1, buffer)` writes its rows n0..n1 as float32 into
    `buffer` and returns them [n1 - n0, K]. Each block multiplied by MKL's float32 GEMM (at most
    WIDENED values, needs MKL) or, `kernel`, by `f32_rows` (DEQUANTIZED values, whole multiples
    of 32 rows; n and K multiples of 32: `shapes_fit`), which gives each row its own bits whatever
    rows surround it. The buffer is kept per thread. Into `out` where given (see `result`)."""
    from . import mkl_bf16

    m, k = x.shape
    out = result(out, m, n)
    step = max(32, DEQUANTIZED // k // 32 * 32) if kernel else max(1, WIDENED // k)
    buffer = scratch(min(step, n) * k)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        block = widen(n0, n1, buffer)
        if kernel:
            library().f32_rows(x.ctypes.data, block.ctypes.data, out[:, n0:].ctypes.data, m, n1 - n0, k, n,
                               threads_for(m * (n1 - n0) * k))
        else:
            mkl_bf16.sgemm_t(x, block, out[:, n0:n1])
    return out


def bf16_widen(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The float32 values of w [N, K] bfloat16 bits, on every core, into the start of `out`
    (contiguous float32, at least N x K values); returns that view [N, K]."""
    n, k = w.shape
    if w.dtype != np.uint16 or not w.flags.c_contiguous:
        raise ValueError(f"bf16_widen needs contiguous uint16 rows, got {w.dtype} {w.shape}")
    if out.dtype != np.float32 or out.size < n * k or not out.flags.c_contiguous:
        raise ValueError(f"bf16_widen needs a contiguous float32 out of at least {n} x {k} values")
    out = out.reshape(-1)[: n * k].reshape(n, k)
    library().bf16_widen(w.ctypes.data, out.ctypes.data, n, k, threads_for(n * k * 8))
    return out


def wide_t(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None, parts: int = 3) -> np.ndarray:
    """`x @ w.T` for any number of float32 rows x [M, K] and w [N, K] bfloat16 bits, x rounded to
    bfloat16 (parts=1) or as it is (parts=3: float32 products), on CPUs without AMX (where MKL's
    bfloat16 GEMM is no faster than its float32 one and would take x in three parts):
    `wide_rows`, which multiplies many rows as fast as MKL's float32 GEMM over widened weights
    (a Zen 4: 80-100 GMAC/s both) and gives each row its own bits. For N or K not whole
    multiples of 32 (`shapes_fit`), float32 products only: that GEMM over the weight widened a
    block at a time (`blocks_gemm`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"wide_t: rows of {x.shape[1]} values by a weight of shape {w.shape}")
    (m, k), n = x.shape, w.shape[0]
    if shapes_fit(n, k) and w.dtype == np.uint16 and w.flags.c_contiguous:
        out = result(out, m, n)
        if not _wide_rows(x, w, parts, out):
            raise ValueError(f"wide_t takes x in 1 or 3 parts, not {parts}")
        return out
    if parts != 3:
        raise ValueError(f"wide_t rounds x to bfloat16 only for whole multiples of 32 ({n} x {k})")
    return blocks_gemm(x, w.shape[0], lambda n0, n1, buffer: bf16_widen(w[n0:n1], buffer), out)


def bf16_split(x: np.ndarray, parts: int) -> np.ndarray:
    """float32 x [M, K] as `parts` (1 or 3) bfloat16 parts, [parts, M, K] bits (uint16): each the
    nearest to what the parts before it left, so three add up to x exactly (values below 2^-126
    count as zeros). Needs the AMX kernels (`amx`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((parts, *x.shape), np.uint16)
    if not amx():
        raise ValueError(f"bf16_split needs the AMX kernels: {amx_reason}")
    if not library().bf16_split(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], parts):
        raise ValueError(f"bf16_split takes 1 or 3 parts, not {parts}")
    return out


def q_fits(bits: int, group_size: int, k: int) -> bool:
    """Whether a product with a k-column weight of `bits` bits in groups of `group_size` goes
    through the quantized kernel."""
    return bits in Q_BITS and group_size in Q_GROUPS and k % group_size == 0 and library() is not None


def _check(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int, k: int,
           packed: bool = False):
    n = w.shape[0]
    groups = (n, k // group_size) if group_size and k % group_size == 0 else None
    if (w.dtype != np.uint32 or w.shape != (n, k * bits // 32) or not w.flags.c_contiguous
            or any(a.dtype != np.float32 or a.shape != groups or not a.flags.c_contiguous for a in (scales, biases))):
        raise ValueError(f"a quantized product needs a contiguous uint32 weight of {k * bits // 32} columns and "
                         f"float32 scales and biases of {k} / {group_size} columns, got {w.dtype} {w.shape}, "
                         f"{scales.dtype} {scales.shape}, {biases.dtype} {biases.shape}")
    fits, name, sizes = ((q_packed_fits, "packed quantized kernel", "64 or 128") if packed
                         else (q_fits, "quantized kernel", "32, 64 or 128"))
    if not fits(bits, group_size, k):
        available, why = (packed_kernel(), packed_reason) if packed else (library() is not None, reason)
        raise ValueError(f"the {name} takes 4 or 8 bits in groups of {sizes} ({bits} bits, group {group_size})"
                         if available else f"the {name} is not available: {why}")


def q_rows_t(x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
             group_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """`x @ dequantize(w).T` in float32 for x [M, K] float32 and w [N, K * bits / 32] uint32 as
    `mx.quantize` packs it, with float32 scales and biases [N, K / group_size]; into `out`
    where given (see `result`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    (m, k), n = x.shape, w.shape[0]
    _check(w, scales, biases, bits, group_size, k)
    out = result(out, m, n)
    reordered = np.empty(m * k if bits == 4 else 0, np.float32)
    library().q_rows(x.ctypes.data, w.ctypes.data, scales.ctypes.data, biases.ctypes.data, out.ctypes.data, m, n, k,
                     bits, group_size, threads_for(m * n * k), reordered.ctypes.data)
    return out


def q_packed_fits(bits: int, group_size: int, k: int) -> bool:
    """Whether a product with a k-column weight of `bits` bits in groups of `group_size` can go
    through the packed quantized kernel (`q_pack`, `q_packed_t`: AMX or VNNI)."""
    return bits in Q_BITS and group_size in Q_PACKED_GROUPS and k % group_size == 0 and packed_kernel() is not None


class QPacked(NamedTuple):
    """A quantized weight stored for `q_packed_t` (`q_pack`): per block of 16 weight rows (the last
    padded with zeros), each chunk of 64 values as AMX's B operand, and the block's scales and
    biases by group, a vector over its 16 rows."""

    weight: np.ndarray  # uint8 [blocks, 16 * k * bits / 8]
    scales: np.ndarray  # float32 [blocks, k / group_size, 16], or their bfloat16 bits (uint16, `halved`)
    biases: np.ndarray  # the same
    n: int
    bits: int
    group_size: int

    @property
    def k(self) -> int:
        return self.weight.shape[1] * 8 // (16 * self.bits)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of the weight dequantized, [len(ids), k] float32: the values `mx.dequantize`
        gives (an embedding's lookup)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise IndexError(f"rows {ids.min()}..{ids.max()} of a weight of {self.n}")
        block, r, chunks = ids // 16, ids % 16, self.k // 64
        if self.bits == 8:
            q = self.weight.reshape(-1, chunks, 16, 16, 4)[block, :, :, r]  # [ids, chunks, 16, 4]
        else:  # the low nibbles hold a chunk's first 32 values, the high ones the rest
            half = self.weight.reshape(-1, chunks, 8, 16, 4)[block, :, :, r]
            q = np.concatenate([half & 15, half >> 4], axis=2)
        q = q.reshape(ids.size, -1, self.group_size).astype(np.float32)
        s, b = (_widen(a[block, :, r])[..., None] for a in (self.scales, self.biases))
        return (q * s + b).reshape(ids.size, self.k)

    def halved(self) -> "QPacked":
        """The same weight with its scales and biases as bfloat16 bits (new arrays, half the
        bytes) where each is a bfloat16 value (as a bfloat16 checkpoint's are), else itself."""
        if self.scales.dtype == np.uint16:
            return self
        bits = [a.view(np.uint32) for a in (self.scales, self.biases)]
        if any(np.any(b & 0xFFFF) for b in bits):
            return self
        return self._replace(scales=(bits[0] >> 16).astype(np.uint16), biases=(bits[1] >> 16).astype(np.uint16))


def _widen(a: np.ndarray) -> np.ndarray:
    """float32 values, or bfloat16 bits (uint16) widened to float32 exactly."""
    return (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a


def q_pack(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int,
           in_place: bool = False) -> QPacked:
    """A weight as `mx.quantize` packs it ([N, K * bits / 32] uint32, float32 scales and biases
    [N, K / group_size]) stored for `q_packed_t`; `in_place` (N a multiple of 16, writable
    arrays): in the same memory, which then holds only the stored form."""
    n, k = w.shape[0], w.shape[1] * 32 // bits if bits else 0
    _check(w, scales, biases, bits, group_size, k, packed=True)
    blocks, groups = -(-n // 16), k // group_size
    if in_place:
        if n % 16 or not all(a.flags.writeable for a in (w, scales, biases)):
            raise ValueError(f"q_pack packs in place only writable weights of a multiple of 16 rows, not {n}")
        packed = QPacked(w.view(np.uint8).reshape(blocks, -1), scales.reshape(blocks, groups, 16),
                         biases.reshape(blocks, groups, 16), n, bits, group_size)
    else:
        packed = QPacked(np.empty((blocks, 16 * k * bits // 8), np.uint8), np.empty((blocks, groups, 16), np.float32),
                         np.empty((blocks, groups, 16), np.float32), n, bits, group_size)
    if library().q_pack(w.ctypes.data, scales.ctypes.data, biases.ctypes.data, packed.weight.ctypes.data,
                        packed.scales.ctypes.data, packed.biases.ctypes.data, n, k, bits, group_size,
                        threads_for(n * k)) < 0:
        raise MemoryError(f"q_pack could not allocate its buffers for rows of {k} values")
    return packed


def q_packed_t(x: np.ndarray, w: QPacked, out: np.ndarray | None = None, parts: int = 3) -> np.ndarray:
    """`x @ dequantize(w).T` in float32 through AMX or VNNI (`packed_kernel`: the same numbers)
    for x [M, K] float32, any M: x in 8-bit parts per group times the weights' integers,
    exactly, then scaled in float32. Three parts keep 21 bits below each group's largest
    value: a product's error from them, at most 2^-21 of that value times the weights' sum, is
    below float32's own in summing K products (about sqrt(K) 2^-24 of their size). `parts` 4
    keeps 28 bits (more than float32's 24 below each value) for a third more work, which on
    VNNI bounds products of a few rows by the cores, not the memory (on a Zen 4, a 4-bit
    decoder step of four rows took 170 ms against 131 in three parts, a pass of 8 positions
    316 against 241; one row, which the memory bounds, 63 and 62).
    Into `out` [M, N] where given (see `result`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    (m, k), n = x.shape, w.n
    kernel = packed_kernel()
    if kernel is None:
        raise ValueError(f"the packed quantized kernel is not available: {packed_reason}")
    out = result(out, m, n)
    product = library().q_amx if kernel == "AMX" else library().q_vnni
    used = 0 if k != w.k else product(x.ctypes.data, w.weight.ctypes.data, w.scales.ctypes.data, w.biases.ctypes.data,
                                      out.ctypes.data, m, n, k, w.bits, w.group_size, parts, threads_for(m * n * k),
                                      int(w.scales.dtype == np.uint16))
    if used == 0:  # refused: nothing computed
        raise ValueError(f"q_packed_t: rows of {k} values by a weight of {w.k} columns, {w.bits} bits in groups of "
                         f"{w.group_size}, x in {parts} parts (it takes 4 or 8 bits in groups of 64 or 128, x in 3 "
                         f"or 4 parts)")
    if used < 0:
        raise MemoryError(f"the {kernel} quantized kernel could not allocate its buffers for {m} rows of {k}")
    return out


def q_dequantize(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """`dequantize(w)` [N, K] float32 (the values of `mx.dequantize`) for w, scales and biases as in
    `q_rows_t`, on every core: for products of many rows, which a float32 GEMM does faster.
    `out`: where to write it (float32, at least N x K values; a view of its start is returned)."""
    n, k = w.shape[0], w.shape[1] * 32 // bits
    _check(w, scales, biases, bits, group_size, k)
    if out is None:
        out = np.empty((n, k), np.float32)
    elif out.dtype != np.float32 or out.size < n * k or not out.flags.c_contiguous:
        raise ValueError(f"q_dequantize needs a contiguous float32 out of at least {n} x {k} values")
    out = out.reshape(-1)[: n * k].reshape(n, k)
    library().q_dequantize(w.ctypes.data, scales.ctypes.data, biases.ctypes.data, out.ctypes.data, n, k, bits,
                           group_size, threads_for(n * k))
    return out


def attend_fits(heads: int, kv_heads: int, head_dim: int, queries: int = 1) -> bool:
    """Whether the attention of `queries` positions goes through the kernel (`attend`)."""
    return (head_dim % 16 == 0 and heads % kv_heads == 0 and heads // kv_heads * queries <= 64
            and library() is not None)


def attends(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `attend` takes any number of positions (a prompt, an encoder chunk) for these heads."""
    return head_dim % 16 == 0 and heads % kv_heads == 0 and library() is not None


def _mask_bytes(mask: np.ndarray | None) -> np.ndarray | None:
    """A mask as the kernels read it, one byte per slot (nonzero: visible): a contiguous bool
    mask as it is (a step's layers all read the same one), else converted."""
    if mask is None:
        return None
    if mask.dtype == np.bool_ and mask.flags.c_contiguous:
        return mask.view(np.uint8)
    return np.ascontiguousarray(mask, dtype=np.uint8)


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, stored: int, mask: np.ndarray | None,
           scale: float) -> np.ndarray:
    """softmax(q k^T scale) v for L positions: q [B, H, L, D] float32 over the first `stored`
    slots of a cache keys, values [B, Hk, capacity, D] float32 (query head h reads key head
    h // (H / Hk)); mask [L, stored] (or [stored] for one position) bool, True where a query sees
    a slot, or None. Exact softmax, float32 sums; every stream's numbers are its own whatever
    the batch. Up to 64 queries per key head (`attend_fits`: steps, speculative passes), each
    key is read once for all of them; more (`attends`) go in blocks of 8 queries over the keys
    some query of the block sees, each query's numbers the same whatever its block."""
    B, H, L, D = q.shape
    Hk, capacity = keys.shape[1], keys.shape[2]
    if mask is not None and L == 1 and mask.shape == (stored,):
        mask = mask.reshape(1, stored)
    if (keys.shape != (B, Hk, capacity, D) or values.shape != keys.shape or not 0 < stored <= capacity
            or any(a.dtype != np.float32 or not a.flags.c_contiguous for a in (q, keys, values))
            or (mask is not None and mask.shape != (L, stored))):
        raise ValueError(f"attend needs float32 contiguous q [B, H, L, D] and caches [B, Hk, >= {stored}, D], and a "
                         f"mask of {L} x {stored}, got {q.shape}, {keys.shape}, {values.shape}, "
                         f"{None if mask is None else mask.shape}")
    if not attends(H, Hk, D):
        raise ValueError(f"attend takes head sizes of a multiple of 16 and query heads a multiple of the key heads "
                         f"({H} / {Hk} heads of {D})" if library() is not None else
                         f"the attention kernel is not available: {reason}")
    out = np.empty_like(q)
    flags = _mask_bytes(mask)
    # The query heads of a key head and their positions are its G = H / Hk * L queries, in
    # the order of q's memory: query g is at position g % L.
    where = (q.ctypes.data, keys.ctypes.data, values.ctypes.data, out.ctypes.data, B * Hk, H // Hk * L, stored, D,
             capacity * D, scale, None if flags is None else flags.ctypes.data, L)
    work = threads_for(2 * B * H * L * stored * D)
    if attend_fits(H, Hk, D, L):
        library().attend(*where, scratch(B * H * L * stored).ctypes.data, work)
    elif library().attend_many(*where, work) < 0:
        raise MemoryError(f"the attention kernel could not allocate its buffers for {stored} keys")
    return out


def silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`silu(g) * u` (SwiGLU) for float32 arrays of one shape, in one pass on every core
    (`library()`: AVX-512), into `out` (may be g or u: pages already touched, where a new array's
    cost the kernel's time again) or a new array."""
    g, u = (np.ascontiguousarray(a, dtype=np.float32) for a in (g, u))
    if g.shape != u.shape or (out is not None and (out.shape != g.shape or out.dtype != np.float32
                                                   or not out.flags.c_contiguous or not out.flags.writeable)):
        raise ValueError(f"silu_mul needs float32 arrays of one shape and a writable contiguous float32 out, got "
                         f"{g.shape}, {u.shape} and {None if out is None else (out.dtype, out.shape)}")
    if library() is None:
        raise ValueError(f"the CPU kernels are not available: {reason}")
    out = np.empty_like(g) if out is None else out
    library().silu_mul(g.ctypes.data, u.ctypes.data, out.ctypes.data, g.size, threads_for(64 * g.size))
    return out


def rope_heads(x: np.ndarray, heads: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE of a product's rows x [B, L, heads * D] float32 (each head's values in interleaved
    pairs) by the angles of their positions, cos and sin [L, D / 2] float32: [B, heads, L, D],
    heads first and contiguous, as attention reads them. D a multiple of 16."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    cos, sin = (np.ascontiguousarray(a, dtype=np.float32) for a in (cos, sin))
    B, L, width = x.shape
    D = width // heads if heads else 0
    if heads < 1 or D * heads != width or cos.shape != (L, D // 2) or sin.shape != cos.shape or D % 16:
        raise ValueError(f"rope_heads needs x [B, L, heads x D] (D a multiple of 16) and cos, sin [L, D / 2], got "
                         f"{x.shape} in {heads} heads and {cos.shape}, {sin.shape}")
    if library() is None:
        raise ValueError(f"the CPU kernels are not available: {reason}")
    out = np.empty((B, heads, L, D), np.float32)
    library().rope_heads(x.ctypes.data, cos.ctypes.data, sin.ctypes.data, out.ctypes.data, B, L, heads, D,
                         threads_for(16 * x.size))
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, scale: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm of float32 x [..., K] by weight [K]: `(x r) weight`, r = 1 / sqrt(mean(x^2) + eps),
    times `scale` [K] where given, each product rounded in that order (the squares summed in a
    fixed order: the same bits for a row whatever rows are around it)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    K = x.shape[-1]
    weight, *scale = (np.ascontiguousarray(a, dtype=np.float32).reshape(-1) for a in (weight, *([] if scale is None
                                                                                                 else [scale])))
    if weight.size != K or any(a.size != K for a in scale):
        raise ValueError(f"rms_norm needs a weight (and scale) of {K} values, got {weight.size}"
                         f"{'' if not scale else f' and {scale[0].size}'}")
    if library() is None:
        raise ValueError(f"the CPU kernels are not available: {reason}")
    out = np.empty_like(x)
    library().rms_norm(x.ctypes.data, weight.ctypes.data, scale[0].ctypes.data if scale else None, out.ctypes.data,
                       x.size // K if K else 0, K, eps, threads_for(2 * x.size))
    return out


class StepWeight(ctypes.Structure):
    """A weight as `layer_step` multiplies it: stored for `q_packed_t` (4 or 8 bits), or bfloat16
    bits [N, K] for `rows_t` (bits 16), x in `parts` parts; and a float32 bias, or none."""

    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("biases", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_long), ("k", ctypes.c_long), ("bits", ctypes.c_int),
                ("group", ctypes.c_int), ("half", ctypes.c_int), ("parts", ctypes.c_int)]

    @classmethod
    def of(cls, weight: "QPacked | np.ndarray", parts: int, bias: np.ndarray | None = None) -> "StepWeight":
        """A `QPacked` weight with x in `parts` parts (3 or 4), or bfloat16 bits [N, K] (uint16,
        C-contiguous; multiples of 32) with x in 1 or 3 (as `rows_t`); `bias`: float32 [N]
        (contiguous), or None."""
        if bias is not None and (bias.dtype != np.float32 or not bias.flags.c_contiguous
                                 or bias.shape != (weight.n if isinstance(weight, QPacked) else weight.shape[0],)):
            raise ValueError(f"a step's bias is float32 contiguous, one value per row of its weight, got {bias.dtype} "
                             f"{bias.shape}")
        at = None if bias is None else bias.ctypes.data
        if isinstance(weight, QPacked):
            if parts not in (3, 4):
                raise ValueError(f"a packed weight takes x in 3 or 4 parts, not {parts}")
            return cls(weight.weight.ctypes.data, weight.scales.ctypes.data, weight.biases.ctypes.data, at, weight.n,
                       weight.k, weight.bits, weight.group_size, int(weight.scales.dtype == np.uint16), parts)
        if (weight.dtype != np.uint16 or weight.ndim != 2 or not weight.flags.c_contiguous
                or not shapes_fit(*weight.shape) or parts not in (1, 3)):
            raise ValueError(f"a step's weight is a QPacked one or contiguous bfloat16 bits of multiples of 32 "
                             f"in 1 or 3 parts, got {weight.dtype} {weight.shape} in {parts}")
        return cls(weight.ctypes.data, None, None, at, *weight.shape, 16, 0, 0, parts)


class StepLayer(ctypes.Structure):
    """A transformer layer whose products all go through the row kernels, for `layer_step`: its
    weights (which must outlive it), its norms' float32 weights, and its heads."""

    _fields_ = [*((name, StepWeight) for name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")),
                ("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("heads", ctypes.c_long), ("kv_heads", ctypes.c_long), ("head_dim", ctypes.c_long)]

    @classmethod
    def of(cls, products: dict[str, StepWeight], attention_norm: np.ndarray, ffn_norm: np.ndarray, eps: float,
           heads: int, kv_heads: int, head_dim: int) -> "StepLayer":
        """The layer of these weights (wq, wk, wv, wo, w1, w3, w2) and float32 contiguous norms."""
        return cls(**products, attention_norm=attention_norm.ctypes.data, ffn_norm=ffn_norm.ctypes.data, eps=eps,
                   heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def layer_step(layer: StepLayer, x: np.ndarray, ffn_scale: np.ndarray | None, cos: np.ndarray, sin: np.ndarray,
               keys: np.ndarray, values: np.ndarray, capacity: int, slot: int, stored: int, mask: np.ndarray | None,
               scale: float) -> None:
    """L positions of B streams through `layer` (at most MAX_ROWS rows), in place: x [B, L, dim]
    float32 += attention(rms_norm(x)), then += feed_forward(rms_norm(x) * ffn_scale) (the
    decoder's; None: the encoder's, unscaled), with the numbers of those steps through
    `rms_norm`, the products' row kernels (`q_packed_t`, `rows_t`), `rope_heads`, `attend` and
    `silu_mul`, in one call. The positions' keys and values (rotated by cos, sin [L, D / 2])
    are written into slots (slot + i) % capacity of the rings keys, values [B, Hk, slots, D]
    float32 before their queries attend over the first `stored` slots (mask: [L, stored]
    bool, False where a slot is out of a position's view, or None)."""
    B, L, dim = x.shape
    scaled = [] if ffn_scale is None else [ffn_scale]
    if (x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable or B * L > MAX_ROWS
            or keys.shape != values.shape or keys.shape[:2] != (B, layer.kv_heads) or keys.shape[3] != layer.head_dim
            or any(a.dtype != np.float32 or not a.flags.c_contiguous for a in (keys, values, cos, sin, *scaled))
            or any(a.size != dim for a in scaled) or cos.shape != (L, layer.head_dim // 2) or sin.shape != cos.shape
            or (mask is not None and mask.size != L * stored) or library() is None):
        raise ValueError(f"layer_step needs float32 contiguous x [B, L, dim] of at most {MAX_ROWS} rows (writable), "
                         f"rings [B, kv heads, slots, head_dim], a scale of dim values or none, cos and sin "
                         f"[L, head_dim / 2] and a mask of L x `stored` values")
    flags = _mask_bytes(mask)
    work = scratch(library().layer_step_work(ctypes.byref(layer), B * L, stored))
    done = library().layer_step(ctypes.byref(layer), x.ctypes.data, B, L, scaled[0].ctypes.data if scaled else None,
                                cos.ctypes.data, sin.ctypes.data, keys.ctypes.data, values.ctypes.data, keys.shape[2],
                                capacity, slot, stored, None if flags is None else flags.ctypes.data, scale,
                                work.ctypes.data, threads(), amx() | dot_bf16() << 1)
    if done == 0:
        raise ValueError(f"layer_step does not take this layer's shapes, or {L} positions from slot {slot} of a ring "
                         f"of {capacity} ({keys.shape[2]} allocated, {stored} stored)")
    if done < 0:
        raise MemoryError(f"the quantized kernel could not allocate its buffers for {B * L} rows")
