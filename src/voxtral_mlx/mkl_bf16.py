"""bfloat16 products on x86-64 CPUs through Intel MKL, for MLX's CPU build.

MLX's CPU matmul in bfloat16 is a plain loop. MKL's `cblas_gemm_bf16bf16f32` multiplies
bfloat16 matrices with float32 accumulation (AMX or AVX-512 BF16 where the CPU has them) at
the speed of memory. With `load(dtype="bfloat16")` on the CPU where MKL is loaded, the
weights of every linear layer and of the tied embedding stay bfloat16, as in the checkpoint:
a decoder step reads half the bytes of float32. Everything else (norms, RoPE, attention,
the conv stem, the residual stream) computes in float32; each product's input is rounded to
bfloat16, as a bfloat16 GPU run rounds it. Products of at most 32 rows (decoder steps, batches,
speculative passes) go through a row kernel of `cpu_kernels` (AMX's, else the AVX-512 one):
MKL halves its speed from two rows on, and without AMX its one-row product runs at a third
of the kernel's.

Where the CPU has a row kernel, `load(dtype="float32")` (the CPU default) over a bfloat16
checkpoint takes the same layers with float32 products: each input in three bfloat16 parts
that add up to it exactly, each part's products with the bfloat16 weights exact in float32 and
summed in float32, as a float32 GEMM of the widened weights sums them (without AMX: the weights
widened in registers and multiplied by x itself, for any number of rows). The numbers are
float32's (up to the order of the sums), from half the memory: a decoder step of the 4B model
reads 6.9 GB instead of 13.7 (260-290 ms instead of 530 on two AMX cores, 218-277 instead of
703 on two Zen 4 cores), and loading skips the widening.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import _blas, cpu_kernels

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def _gemm():
    """MKL's `cblas_gemm_bf16bf16f32` (LP64 interface) and the library, or (None, None) without MKL.

    Called directly, so it works whether or not MKL also serves MLX's own matmuls (`_blas`);
    `VOXTRAL_MLX_BLAS=builtin` or `openblas` turns it off too.
    """
    if sys.platform != "linux" or os.environ.get("VOXTRAL_MLX_BLAS", "auto").strip().lower() not in ("auto", "mkl"):
        return None, None
    for path in ([_blas.loaded] if _blas.loaded and "mkl" in _blas.loaded.lower() else []) + _blas._candidates("mkl"):
        try:
            lib = ctypes.CDLL(path)
            gemm = lib.cblas_gemm_bf16bf16f32
        except (OSError, AttributeError):
            continue
        i, p = ctypes.c_int, ctypes.c_void_p
        gemm.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
        gemm.restype = lib.cblas_sgemm.restype = None
        lib.cblas_sgemm.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
        lib.MKL_Set_Num_Threads.argtypes = [i]
        lib.MKL_Set_Num_Threads_Local.argtypes = [i]
        lib.MKL_Set_Num_Threads_Local.restype = i
        return gemm, lib
    return None, None


_GEMM, _MKL = _gemm()


def available() -> bool:
    """Whether bfloat16 products can go through MKL here (Linux x86-64 with the `mkl` extra)."""
    return _GEMM is not None


def bits(w: mx.array) -> np.ndarray:
    """The bfloat16 bit patterns of `w` as a numpy uint16 view of the same memory."""
    view = w.view(mx.uint16)
    mx.eval(view)
    return np.asarray(view)


def matmul_t(x: mx.array, w: np.ndarray, parts: int = 1) -> mx.array:
    """`x @ w.T` for x [..., K] and w [N, K] bfloat16 bits; float32 out. x is rounded to
    bfloat16 (parts=1, as a bfloat16 GPU run rounds it) or taken in three bfloat16 parts that
    add up to it exactly (parts=3: float32 products)."""
    *lead, K = x.shape
    rows = x.reshape(-1, K).astype(mx.float32)
    mx.eval(rows)
    return mx.array(rows_t(np.asarray(rows), w, parts)).reshape(*lead, w.shape[0])


def rows_t(a: np.ndarray, w: np.ndarray, parts: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """`matmul_t` on float32 numpy rows a [M, K]: [M, N] float32, into `out` where given
    (`cpu_kernels.result`)."""
    if cpu_kernels.fits(a.shape[0], w.shape[0], a.shape[1]):
        return cpu_kernels.rows_t(a, w, parts, out)
    if not cpu_kernels.amx() and (parts == 3 or cpu_kernels.shapes_fit(*w.shape)):
        # MKL's bfloat16 GEMM would cost three float32 ones, and is no faster than the row kernel for one part
        return cpu_kernels.wide_t(a, w, out, parts)
    if parts == 1:
        return _gemm_t(bits(mx.array(a).astype(mx.bfloat16)), w, out)
    return _gemm_t(cpu_kernels.bf16_split(a, parts), w, out)


STACKED = 128  # rows up to which x's parts go to MKL as one matrix (the weights read once)


def _gemm_t(a: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`a @ w.T` [M, N] float32 through MKL for bfloat16 bits a [M, K] (or [P, M, K]: the sum
    of the P parts' products) and w [N, K], into `out` where given."""
    a = a.reshape(-1, *a.shape[-2:])
    (P, M, K), N = a.shape, w.shape[0]
    out = cpu_kernels.result(out, M, N)
    if P > 1 and M <= STACKED:  # one product of the P M rows, summed p0 + (p1 + p2) as `rows_t` sums
        parts = np.empty((P * M, N), np.float32)
        with _all_cores():
            _GEMM(ROW_MAJOR, NO_TRANS, TRANS, P * M, N, K, 1.0, a.ctypes.data, K, w.ctypes.data, K, 0.0,
                  parts.ctypes.data, N)
        parts = parts.reshape(P, M, N)
        for p in range(P - 2, 0, -1):
            parts[p] += parts[p + 1]
        return np.add(parts[0], parts[1], out=out)
    with _all_cores():  # many rows: each part added into the sums, smallest first
        for p in reversed(range(P)):
            _GEMM(ROW_MAJOR, NO_TRANS, TRANS, M, N, K, 1.0, a[p].ctypes.data, K, w.ctypes.data, K,
                  0.0 if p == P - 1 else 1.0, out.ctypes.data, N)
    return out


def sgemm_t(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out = x @ w.T through MKL's float32 GEMM on every core, for float32 x [M, K] and w [N, K]
    (C-contiguous) and out [M, N] (rows may be strided: a block of columns of a wider result)."""
    (M, K), N = x.shape, w.shape[0]
    with _all_cores():
        _MKL.cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, M, N, K, 1.0, x.ctypes.data, K, w.ctypes.data, K, 0.0,
                         out.ctypes.data, out.strides[0] // 4)


@contextmanager
def _all_cores():
    """This thread's MKL calls on every core, even after `_quiet_blas_threads`."""
    before = _MKL.MKL_Set_Num_Threads_Local(cpu_kernels.threads()) if _single_threaded else 0
    try:
        yield
    finally:
        if _single_threaded:
            _MKL.MKL_Set_Num_Threads_Local(before)


_single_threaded = False


def _quiet_blas_threads():
    """With the kernels of `cpu_kernels` in use, the BLAS calls between their products run on
    one thread: idle BLAS threads spin after each call and take the second core from the
    kernels' worker. MKL's (MLX's own float32 products) spin for 200 ms: a bfloat16 decoder step
    took 360 ms with them, 306 ms without. numpy's OpenBLAS (the attention of `host`'s passes
    of many rows): a 4-bit prompt of 39 positions took 2.6 s with its threads, 1.0 s without, the
    encoder 870 ms per audio second against 523. This module's large products still use every
    core, through MKL's per-thread setting. The settings stay for the process: a float32 model
    loaded after a bfloat16 one multiplies on one thread, and so does numpy's matmul."""
    global _single_threaded, _quiet_openblas
    if cpu_kernels.library() is None:
        return
    if not _single_threaded and _MKL is not None:
        _MKL.MKL_Set_Num_Threads(1)
        _single_threaded = True
    if not _quiet_openblas:
        from threadpoolctl import ThreadpoolController

        ThreadpoolController().select(internal_api="openblas").limit(limits=1)
        _quiet_openblas = True


_quiet_openblas = False


class _Product(nn.Module):
    """A bfloat16 weight (`_w`, its bits) that MKL and the row kernel multiply in place, with
    x rounded to bfloat16 (parts=1) or in three parts (parts=3, see `matmul_t`). `mapped`: the
    bits where the weight's file is mapped (`weights.mapped_products`); `weight` then stays the
    lazy tensor of the file, read only if something else evaluates it."""

    def _take(self, weight: mx.array, parts: int, mapped: np.ndarray | None = None):
        if mapped is None:
            self.weight = weight.astype(mx.bfloat16)
            self._w = bits(self.weight)
        else:
            self.weight, self._w = weight, mapped
        self._mapped = mapped is not None
        self._parts = parts

    @property
    def host_features(self) -> int:
        """Columns of `host`'s result."""
        return self._w.shape[0]

    def host_rows_exact(self, rows: int) -> bool:
        """Whether `host` gives each of up to `rows` rows the bits it gets alone: the row
        kernel's products do, MKL's GEMM's may not (they may sum in another order)."""
        return cpu_kernels.fits(rows, *self._w.shape)

    def host(self, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The product (plus the bias, if any) on float32 numpy rows [M, K] (`host`), into
        `out` [M, N] where given."""
        y = rows_t(a, self._w, self._parts, out)
        if "bias" in self:
            y += np.asarray(self.bias)
        return y


class Linear(_Product):
    """A linear layer whose bfloat16 weight MKL multiplies in place; the bias is float32. Its
    input is rounded to bfloat16 (parts=1) or multiplied in float32 (parts=3, see `matmul_t`)."""

    def __init__(self, linear: nn.Linear, parts: int = 1, mapped: np.ndarray | None = None):
        super().__init__()
        self._take(linear.weight, parts, mapped)
        if "bias" in linear:
            self.bias = linear.bias.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = matmul_t(x, self._w, self._parts)
        return y + self.bias if "bias" in self else y


class Embedding(_Product):
    """The tied embedding: rows looked up in bfloat16 and widened, the head through MKL."""

    def __init__(self, embedding: nn.Embedding, parts: int = 1, mapped: np.ndarray | None = None):
        super().__init__()
        self._take(embedding.weight, parts, mapped)

    def __call__(self, ids: mx.array) -> mx.array:
        if self._mapped:  # the rows from the file's mapping, not the whole table through MLX
            return mx.array(self._w[np.asarray(ids).astype(np.intp, copy=False)]).view(mx.bfloat16).astype(mx.float32)
        return self.weight[ids].astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return matmul_t(x, self._w, self._parts)


def adopted(net: nn.Module) -> bool:
    """Whether `net` multiplies through MKL (see `adopt`)."""
    return isinstance(net.embedding_module.tok_embeddings, Embedding)


def describe(net: nn.Module) -> str | None:
    """How `net` multiplies, for messages: None unless it went through `adopt`."""
    if not adopted(net):
        return None
    kernel = cpu_kernels.row_kernel()
    rows = f" and the {kernel} row kernel" if kernel else ""
    if net.embedding_module.tok_embeddings._parts == 3:
        return "float32 products over bfloat16 weights through MKL" + rows
    return "bfloat16 products through MKL" + rows


def float32_available() -> bool:
    """Whether float32 products can be taken over bfloat16 weights here (`adopt(float32=True)`):
    MKL and a row kernel (AMX's, or the AVX-512 one)."""
    return available() and cpu_kernels.row_kernel() is not None


def replace_layers(net: nn.Module, replace) -> nn.Module:
    """Replace each layer `replace(layer)` answers (not None) for; every other float parameter
    becomes float32 (and is evaluated: not the lazy weights of mapped products). For the CPU
    paths here and in `cpu_quant`."""

    def swap(value):
        if isinstance(value, nn.Module):
            new = replace(value)
            if new is not None:
                return new
            for key in list(value):
                value[key] = swap(value[key])
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(mx.float32)
        return value

    swap(net)
    lazy = {id(m.weight) for _, m in net.named_modules() if getattr(m, "_mapped", False)}
    mx.eval([p for _, p in tree_flatten(net.parameters()) if id(p) not in lazy])
    return net


def adopt(net: nn.Module, float32: bool = False, mapped: dict[int, np.ndarray] | None = None) -> nn.Module:
    """Give `net` (loaded in bfloat16) MKL products: linear layers and embeddings take the
    classes above over their bfloat16 weights, every other float parameter becomes float32.
    float32: the products take their inputs in three bfloat16 parts, float32 products (needs
    `float32_available`); else rounded to bfloat16. `mapped`: bits in the file's mapping for the
    layers whose weights stay lazy, by `id` of the layer."""
    parts, mapped = 3 if float32 else 1, mapped or {}
    replace_layers(net, lambda m: Linear(m, parts, mapped.get(id(m))) if isinstance(m, nn.Linear) else
                   Embedding(m, parts, mapped.get(id(m))) if isinstance(m, nn.Embedding) else None)
    _quiet_blas_threads()
    return net
