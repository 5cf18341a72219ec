"""4- and 8-bit quantized products on x86-64 CPUs, through the kernels of `cpu_kernels`.

MLX's CPU quantized matmul is a scalar loop: a decoder step of the 4B model takes about 3 s at
8 or 4 bits, ten times the bfloat16 step, though it reads a half or a quarter of the bytes. On
the CPU, `load` gives a quantized model's layers the classes below where a kernel runs
(AVX-512, a C compiler); everything else (norms, RoPE, attention, the residual stream, the
scales and biases) computes in float32, whatever dtype was asked for. With AMX or AVX-512 VNNI
and groups of 64 or 128, each layer is stored once, in its own memory, for `q_packed_t`
(`cpu_kernels.q_pack`: the same bytes in the order AMX reads them; or taken from the file of
them that a first load keeps on disk, `packs`) and every product goes through it, exact 8-bit
integer products of the weights and x in parts. AMX: 1.3x `q_rows_t`'s speed for a 4-bit
decoder step, 2.4-2.6x for a batch of four files, twice MKL's on the prompt; VNNI (on a Zen
4): 1.4-1.8x for one row at 4 bits (the memory's speed), 1.7x for four rows, 1.2-1.3x the
float32 products of dequantized blocks for many. Scales and biases that are bfloat16 values (a
bfloat16 checkpoint's, the default of `convert`) are kept as their bfloat16 bits, the same
numbers in half the bytes: at 4 bits they were a fifth of a step's bytes as float32. Elsewhere
(other CPUs with AVX-512, groups of 32) the packed weights stay as MLX stores them: products
of up to 32 rows go through `q_rows_t` (the weights widened to float32 in registers), more
through blocks of the weights dequantized and multiplied in float32 (`f32_rows`, or MKL's GEMM
for other shapes). Each kernel gives a row the same bits whatever rows are around it
(`q_packed_t` for any number of rows; the others up to 32, which lies above any decoder step's
rows), so batches and speculative passes keep single-stream tokens.
Layers of other bit widths (6) keep MLX's product.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels, mkl_bf16
from .mkl_bf16 import _quiet_blas_threads, replace_layers

if TYPE_CHECKING:
    from . import packs


def available() -> bool:
    """Whether quantized products can go through the kernel here."""
    return mx.default_device() == mx.cpu and cpu_kernels.library() is not None


def fits(layer: nn.Module) -> bool:
    """Whether the kernel multiplies `layer` (affine, 4 or 8 bits, groups of 32, 64 or 128)."""
    return (isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            and getattr(layer, "mode", "affine") == "affine" and layer.get("biases") is not None
            and cpu_kernels.q_fits(layer.bits, layer.group_size, layer.weight.shape[1] * 32 // layer.bits))


def _take(new: nn.Module, layer: nn.Module, kept: packs.Kept | None = None) -> None:
    """The quantized weight, float32 scales and biases (stored for `q_packed_t` where it runs, the
    scales and biases as bfloat16 bits where they are bfloat16 values; else as MLX stores
    them), and numpy views of them; or the layer as `kept` on disk (`packs`), its weight
    multiplied in the file's mapping (and never read through MLX: `_mapped`)."""
    nn.Module.__init__(new)
    new.group_size, new.bits, new.mode = layer.group_size, layer.bits, getattr(layer, "mode", "affine")
    new._mapped = kept is not None
    if kept is not None:
        new.weight, new.scales, new.biases, new._packed = kept.weight, kept.scales, kept.biases, True
        new._q = cpu_kernels.QPacked(kept.mapped, np.asarray(kept.scales), np.asarray(kept.biases),
                                     layer.weight.shape[0], layer.bits, layer.group_size)
        new.freeze()
        return
    new.weight = layer.weight
    new.scales, new.biases = layer.scales.astype(mx.float32), layer.biases.astype(mx.float32)
    mx.eval(new.weight, new.scales, new.biases)
    new._q = (np.asarray(new.weight), np.asarray(new.scales), np.asarray(new.biases))
    new._packed = cpu_kernels.q_packed_fits(new.bits, new.group_size, new.weight.shape[1] * 32 // new.bits)
    if new._packed:  # stored for the kernel; where the rows come in whole blocks, in the same memory
        n = new.weight.shape[0]
        packed = cpu_kernels.q_pack(*new._q, new.bits, new.group_size, in_place=n % 16 == 0)
        stored = None
        if n % 16 == 0:  # the same buffers, reshaped, unless numpy's views were copies
            stored = [a.reshape(p.shape) for a, p in zip([new.weight.view(mx.uint8), new.scales, new.biases], packed)]
            mx.eval(*stored)
            if any(np.asarray(a).ctypes.data != p.ctypes.data for a, p in zip(stored, packed)):
                stored = None
        new.weight, new.scales, new.biases = stored or [mx.array(p) for p in packed[:3]]
        mx.eval(new.weight, new.scales, new.biases)
        new._q = cpu_kernels.QPacked(np.asarray(new.weight), np.asarray(new.scales), np.asarray(new.biases),
                                     n, new.bits, new.group_size)
        halved = new._q.halved()  # a bfloat16 checkpoint's scales: a step reads 10% fewer bytes at 4 bits
        if halved is not new._q:
            new.scales, new.biases = mx.array(halved.scales), mx.array(halved.biases)
            mx.eval(new.scales, new.biases)
            new._q = halved._replace(scales=np.asarray(new.scales), biases=np.asarray(new.biases))
    new.freeze()


def product(new: nn.Module, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`a @ dequantize(W).T` [M, N] float32 for float32 rows `a` [M, K] (C-contiguous), into
    `out` where given (`cpu_kernels.result`)."""
    if new._packed:
        return cpu_kernels.q_packed_t(a, new._q, out)
    w, s, b = new._q
    kernel = cpu_kernels.shapes_fit(w.shape[0], a.shape[1])
    if a.shape[0] <= cpu_kernels.MAX_ROWS or not (kernel or mkl_bf16.available()):
        return cpu_kernels.q_rows_t(a, w, s, b, new.bits, new.group_size, out)
    # Many rows (prompts, encoder chunks): blocks of the weight dequantized, then multiplied in float32.
    return cpu_kernels.blocks_gemm(a, w.shape[0], lambda n0, n1, buffer: cpu_kernels.q_dequantize(
        w[n0:n1], s[n0:n1], b[n0:n1], new.bits, new.group_size, buffer), out, kernel)


def features(new: nn.Module) -> int:
    """Columns of a product with the layer's weight."""
    return new._q.n if new._packed else new._q[0].shape[0]


def rows_exact(new: nn.Module, rows: int) -> bool:
    """Whether a product of up to `rows` rows gives each row the bits it gets alone:
    `q_packed_t` does for any rows, `q_rows_t` up to MAX_ROWS; beyond, products take another
    path (`f32_rows` over dequantized blocks, or MKL's GEMM), with other bits."""
    return new._packed or rows <= cpu_kernels.MAX_ROWS


def stacks(new: nn.Module) -> bool:
    """Whether rows of several streams, more than `cpu_kernels.MAX_ROWS` in all, may be
    multiplied as one product: `q_packed_t` gives each row the same bits whatever rows are
    multiplied with it. Without AMX or VNNI such rows go through `f32_rows` (exact too) or, for
    other shapes, MKL's GEMM (which may not be): kept a stream at a time."""
    return new._packed


def _product(new: nn.Module, x: mx.array) -> mx.array:
    *lead, K = x.shape
    rows = x.reshape(-1, K).astype(mx.float32)
    mx.eval(rows)
    out = product(new, np.ascontiguousarray(rows))
    return mx.array(out).reshape(*lead, out.shape[1])


class Linear(nn.QuantizedLinear):
    """A quantized linear layer multiplied by the kernel; the bias is float32."""

    def __init__(self, layer: nn.QuantizedLinear, kept: packs.Kept | None = None):
        _take(self, layer, kept)
        if "bias" in layer:
            self.bias = layer.bias.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = _product(self, x)
        return y + self.bias if "bias" in self else y

    host_features = property(features)
    host_stacks = property(stacks)
    host_rows_exact = rows_exact

    def host(self, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The layer on float32 numpy rows [M, K] (`host`), into `out` [M, N] where given."""
        y = product(self, a, out)
        if "bias" in self:
            y += np.asarray(self.bias)
        return y


class Embedding(nn.QuantizedEmbedding):
    """The tied quantized embedding: rows dequantized in float32, the head through the kernel."""

    def __init__(self, layer: nn.QuantizedEmbedding, kept: packs.Kept | None = None):
        _take(self, layer, kept)
        self.num_embeddings, self.dims = layer.num_embeddings, layer.dims

    def __call__(self, ids: mx.array) -> mx.array:
        if self._packed:
            return mx.array(self._q.rows(np.array(ids))).reshape(*ids.shape, -1)
        return mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids], self.group_size, self.bits)

    def as_linear(self, x: mx.array) -> mx.array:
        return _product(self, x)

    host_features = property(features)
    host_stacks = property(stacks)
    host_rows_exact = rows_exact

    def host(self, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The head on float32 numpy rows [M, dims] (`host`), into `out` [M, vocab] where given."""
        return product(self, a, out)


def adopted(net: nn.Module) -> bool:
    """Whether some layer of `net` multiplies through the kernel (see `adopt`)."""
    return any(isinstance(m, (Linear, Embedding)) for _, m in net.named_modules())


def describe(net: nn.Module) -> str | None:
    """How `net` multiplies, for messages: None unless it went through `adopt`."""
    if not adopted(net):
        return None
    layers = [m for _, m in net.named_modules() if isinstance(m, (Linear, Embedding))]
    bits = " and ".join(map(str, sorted({m.bits for m in layers})))
    packed = "AMX" if cpu_kernels.packed_kernel() == "AMX" else "AVX-512 VNNI"
    kinds = sorted({packed if m._packed else "AVX-512" for m in layers})
    kept = (" (its layers in the mapping of the copy kept on disk)" if any(m._mapped for m in layers) else
            " (its layers kept on disk for later loads)" if getattr(net, "_packs_written", False) else "")
    return (f"{bits}-bit products through the {' and '.join(kinds)} kernel{'s' * (len(kinds) > 1)}{kept}, "
            "float32 elsewhere")


def packable(net: nn.Module) -> dict[str, list[int]]:
    """The quantized layers of `net` that `adopt` stores for `q_packed_t`, by path: [rows,
    columns, bits, group size] (what `packs` keeps)."""
    return {path: [m.weight.shape[0], k, m.bits, m.group_size] for path, m in net.named_modules()
            if fits(m) and cpu_kernels.q_packed_fits(m.bits, m.group_size, k := m.weight.shape[1] * 32 // m.bits)}


def adopt(net: nn.Module, kept: dict[str, packs.Kept] | None = None) -> nn.Module:
    """Give the quantized layers of `net` that the kernel can multiply the classes above; every
    other float parameter becomes float32. `kept`: layers by path as read back from disk
    (`packs`), taken as they are."""
    # (by id, not holding the modules: each replaced one is freed as it goes)
    kept = {id(m): kept[path] for path, m in net.named_modules() if path in kept} if kept else {}

    def replace(m):
        if not fits(m):
            return None
        return (Linear if isinstance(m, nn.QuantizedLinear) else Embedding)(m, kept.get(id(m)))

    replace_layers(net, replace)
    _quiet_blas_threads()
    return net
