"""Decoder passes and encoder chunks on the CPU, in numpy around the kernels of `cpu_kernels`.

Where a model's products are CPU kernels on numpy rows (`cpu_quant`, `mkl_bf16`), what MLX
did around them cost as much as the products of a few rows: some 15 small graphs per layer
(10-80 us per op on vectors of 3072 values) and a host round trip per product. That was 35-40
ms of a 4-bit decoder step of the 4B model on two cores (160 ms), and 90 ms of the encoder's
pass over an 80 ms streaming chunk (210 ms). Here the decoder (steps, prompts, speculative
passes) and the encoder's transformer run on numpy arrays: the residual stream in float32
numpy, norms, SwiGLU and RoPE through `cpu_kernels`, the products through the layers' `host`,
the attention through `cpu_kernels.attend` over the ring, written first (a step, or a chunk
that the ring's spare slots hold), else over the ring and the chunk (in numpy where the kernel
does not take the heads, large ones with their key heads shared among threads). Where a
chunk is written first and has at most MAX_ROWS rows (steps, speculative passes, streaming
encoder chunks) and every product is a row kernel, each layer is one call
(`cpu_kernels.layer_step`): the same kernels in the same order, the same bits, without the
30 us per operation that numpy and ctypes took between them (a 4-bit step 5 ms faster). Every
operation works row by row, and products of more rows than the row kernels take run stream by
stream (unless the kernel gives each row the same bits whatever rows surround it), so a
stream's numbers do not depend on the streams beside it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels
from .cache import RingKVCache


def _products(block: nn.Module) -> list[nn.Module]:
    a, f = block.attention, block.feed_forward
    return [a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3]


def fits(blocks: list[nn.Module], caches: list[RingKVCache], extra: list[nn.Module] = ()) -> bool:
    """Whether these transformer blocks can run here over `caches`: on the CPU, with every
    product (and those of `extra`) a kernel on numpy rows (`host`), the attention kernel, and
    float32 rings."""
    a = blocks[0].attention
    return (mx.default_device() == mx.cpu and cpu_kernels.attend_fits(a.n_heads, a.n_kv_heads, a.head_dim)
            and all(c.keys is None or c.keys.dtype == mx.float32 for c in caches)
            and all(hasattr(m, "host") for m in [*extra, *(p for b in blocks for p in _products(b))]))


def rows_exact(net: nn.Module, rows: int) -> bool:
    """Whether decoder passes of up to `rows` positions run here with each position's numbers
    those of a step of its own: on the host, every product (the head's too) through a row
    kernel, which gives a row the same bits whatever rows are multiplied with it."""
    head = net.embedding_module.tok_embeddings
    products = [head, *(p for b in net.layers for p in _products(b))]
    return fits(net.layers, [], [head]) and all(
        hasattr(m, "host_rows_exact") and m.host_rows_exact(rows) for m in products)


def rotation(positions, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [..., head_dim / 2] float32 of RoPE's angles `p * theta^(-2d / head_dim)` for
    a position or an array of them (angles in float64)."""
    frequencies = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.multiply.outer(np.asarray(positions, np.float64), frequencies)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Interleaved pairs `(x[2d], x[2d + 1])` of x [..., head_dim] rotated."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rotated(y: np.ndarray, n: int, head_dim: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """A product's rows y [B, L, n * head_dim] as n heads turned by RoPE, [B, n, L, head_dim]
    contiguous: through `cpu_kernels.rope_heads` where the library is (one pass, where numpy
    took six and a copy), else `rope`."""
    if cpu_kernels.library() is not None and head_dim % 16 == 0:
        return cpu_kernels.rope_heads(y, n, cos, sin)
    B, L, _ = y.shape
    return np.ascontiguousarray(rope(y.reshape(B, L, n, head_dim).transpose(0, 2, 1, 3), cos, sin))


def rms_norm(x: np.ndarray, norm: nn.RMSNorm, scale: np.ndarray | None = None) -> np.ndarray:
    """`norm` on float32 x [..., dim] (times `scale` [dim] where given): through
    `cpu_kernels.rms_norm` where the library is (one pass, where numpy took five), else numpy."""
    if cpu_kernels.library() is not None:
        return cpu_kernels.rms_norm(x, np.asarray(norm.weight), norm.eps, scale)
    mean = np.mean(np.square(x), axis=-1, keepdims=True)
    y = x * (np.float32(1) / np.sqrt(mean + np.float32(norm.eps))) * np.asarray(norm.weight)
    return y if scale is None else y * scale


def silu_product(g: np.ndarray, u: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """`silu(g) * u` for float32 arrays of one shape, through `cpu_kernels.silu_mul` where the
    library is (8x numpy's four passes over a batch's encoder chunk, in place), else numpy.
    `overwrite`: into g where it is a writable contiguous float32 array."""
    into = g if overwrite and g.dtype == np.float32 and g.flags.c_contiguous and g.flags.writeable else None
    if cpu_kernels.library() is not None:
        return cpu_kernels.silu_mul(g, u, into)
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g < -88: silu is then -0
        denominator = np.exp(-g)
    denominator += np.float32(1)
    out = np.divide(g, denominator, out=into)
    out *= u
    return out


# Multiply-adds of a numpy attention from which its key heads are shared among threads: numpy's
# BLAS runs on one thread here (`mkl_bf16._quiet_blas_threads`), and an offline encoder chunk's
# attention (376 positions over up to 1126) took as long as the chunk's products.
SPLIT_ATTENTION = 1 << 24
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # a forked child has none of the parent's threads (nor its lock's holder)
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def attention_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float) -> np.ndarray:
    """Softmax attention of float32 q [B, H, L, D] over k, v [B, Hk, S, D] (query head h reads
    kv head h // (H / Hk)); mask [L, S] True where visible, or None. Large ones run their key
    heads on every core, each head's numbers as on one."""
    global _pool
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    threads = min(cpu_kernels.threads(), Hk)
    if threads < 2 or B * H * L * S * D < SPLIT_ATTENTION:
        return _attention(q, k, v, mask, scale)
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(cpu_kernels.threads(), thread_name_prefix="voxtral-attention")
    G, bounds = H // Hk, np.linspace(0, Hk, threads + 1).astype(int)
    shares = [_pool.submit(_attention, q[:, a * G : b * G], k[:, a:b], v[:, a:b], mask, scale)
              for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([s.result() for s in shares], axis=1)


def attention_chunk(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float) -> np.ndarray:
    """`attention_rows` (same arguments) through `cpu_kernels.attend` where it takes the heads, any
    number of positions; else in numpy."""
    if cpu_kernels.attends(q.shape[1], k.shape[1], q.shape[3]):
        q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
        return cpu_kernels.attend(q, k, v, k.shape[2], mask, scale)
    return attention_rows(q, k, v, mask, scale)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float) -> np.ndarray:
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    # The query heads sharing a kv head are one matrix of G * L rows.
    scores = q.reshape(B, Hk, (H // Hk) * L, D) @ np.swapaxes(k, -1, -2)  # [B, Hk, G * L, S]
    scores *= np.float32(scale)
    scores = scores.reshape(B, Hk, H // Hk, L, S)
    if mask is not None:
        scores += np.where(mask, np.float32(0), np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return (scores.reshape(B, Hk, (H // Hk) * L, S) @ v).reshape(B, H, L, D)


def linear(layer: nn.Module, x: np.ndarray) -> np.ndarray:
    """`layer` on float32 x [B, L, K]: every row at once where the row kernels take them (up to
    `cpu_kernels.MAX_ROWS` rows of the shapes they take: `host_rows_exact`) or where the
    layer's product gives each row the same bits whatever rows are around it (`host_stacks`),
    else each stream's rows apart, as in the stream's own run: the products of more rows, or of
    other shapes, go to other kernels, or sum in an order that depends on how many there are (MKL)."""
    B, L, K = x.shape
    if B == 1 or getattr(layer, "host_stacks", False) or (B * L <= cpu_kernels.MAX_ROWS
                                                         and layer.host_rows_exact(B * L)):
        return layer.host(np.ascontiguousarray(x).reshape(B * L, K)).reshape(B, L, -1)
    out = np.empty((B, L, layer.host_features), np.float32)
    for b in range(B):
        layer.host(np.ascontiguousarray(x[b]), out[b])
    return out


def attention(layer: nn.Module, h: np.ndarray, cache: RingKVCache, mask: np.ndarray | None, in_place: bool,
              cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """`encoder.Attention` on the normed rows h [B, L, dim]. `in_place`: the chunk's keys are
    written first and the kernel reads the ring (mask as `ring_mask(L)`, or `make_mask(1)`, gives
    it); else it attends over the ring as it was and the chunk (mask as `make_mask(L)`)."""
    B, L, _ = h.shape
    out = attend(layer, linear(layer.wq, h), linear(layer.wk, h), linear(layer.wv, h), cache, mask, in_place, cos, sin)
    return linear(layer.wo, out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def attend(layer: nn.Module, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: RingKVCache, mask: np.ndarray | None,
           in_place: bool, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """`attention`'s part between the products: the rows of the queries, keys and values
    [B, L, heads * head_dim] turned by RoPE, the keys and values written, and the queries'
    attention [B, heads, L, head_dim]."""
    B, L, _ = q.shape
    q = rotated(q, layer.n_heads, layer.head_dim, cos, sin)
    k = rotated(k, layer.n_kv_heads, layer.head_dim, cos, sin)
    v = v.reshape(B, L, layer.n_kv_heads, layer.head_dim).transpose(0, 2, 1, 3)
    if in_place:
        keys, values = cache.write_host(k, v)
        return cpu_kernels.attend(q, keys, values, cache.stored, mask, layer.scale)
    stored = cache.stored
    if stored:
        keys, values = cache.host_arrays()
        k_all, v_all = (np.concatenate([a[:, :, :stored], b], axis=2) for a, b in ((keys, k), (values, v)))
    else:
        k_all, v_all = k, v
    out = attention_chunk(q, k_all, v_all, mask, layer.scale)
    cache.write_host(k, v)
    return out


def feed_forward(layer: nn.Module, h: np.ndarray) -> np.ndarray:
    return linear(layer.w2, silu_product(linear(layer.w1, h), linear(layer.w3, h), overwrite=True))


def _start(x: mx.array, caches: list[RingKVCache], layer: nn.Module):
    """x as numpy, the chunk's mask, whether its attention reads the rings in place, its rotations."""
    return _float32(x), *_chunk(x.shape[1], caches, layer)


def _float32(x: mx.array) -> np.ndarray:
    """x as a float32 numpy array of its own (written in place by the layers)."""
    x = x.astype(mx.float32)
    mx.eval(x)
    return np.array(x)


def _chunk(L: int, caches: list[RingKVCache], layer: nn.Module):
    """The mask of a chunk of L positions over these rings, whether its attention reads them in
    place, its rotations."""
    ring = caches[0]
    in_place = ring.fits_in_place(L) and cpu_kernels.attend_fits(layer.n_heads, layer.n_kv_heads, layer.head_dim, L)
    mask = (ring.ring_mask(L) if L > 1 else ring.make_mask(1)) if in_place else ring.make_mask(L)
    if mask is not None:
        mx.eval(mask)
    cos, sin = rotation(ring.offset + np.arange(L), layer.head_dim, layer.rope_theta)
    return None if mask is None else np.asarray(mask), in_place, cos, sin


def encode(transformer: nn.Module, x: mx.array, caches: list[RingKVCache]) -> mx.array:
    """`encoder.EncoderTransformer` (`fits`): frames [B, L, dim] -> [B, L, dim]."""
    x, *chunk = _start(x, caches, transformer.layers[0].attention)
    layers = _layer_steps(transformer, transformer.layers, x, chunk)
    for i, (block, cache) in enumerate(zip(transformer.layers, caches)):
        if layers:
            _layer_step(layers[i], block.attention, x, cache, None, *chunk)
            continue
        x = x + attention(block.attention, rms_norm(x, block.attention_norm), cache, *chunk)
        x = x + feed_forward(block.feed_forward, rms_norm(x, block.ffn_norm))
    return mx.array(rms_norm(x, transformer.norm))


def decode(net: nn.Module, audio: mx.array, tokens: mx.array, caches: list[RingKVCache], scales: list[mx.array],
           every: bool = False) -> mx.array:
    """`net.decode` (`fits`): audio [B, n, dim], tokens [B, n] -> logits of the last position [B, vocab]
    (`every`: of all, [B, n, vocab])."""
    tok = net.embedding_module.tok_embeddings
    scales = [s if s.dtype == mx.float32 else s.astype(mx.float32) for s in scales]
    mx.eval(*scales)
    x, *chunk = _start(audio + tok(tokens), caches, net.layers[0].attention)
    layers = _layer_steps(net, net.layers, x, chunk)
    for i, (block, cache, scale) in enumerate(zip(net.layers, caches, scales)):
        if layers:
            _layer_step(layers[i], block.attention, x, cache, np.asarray(scale), *chunk)
            continue
        x = x + attention(block.attention, rms_norm(x, block.attention_norm), cache, *chunk)
        x = x + feed_forward(block.feed_forward, rms_norm(x, block.ffn_norm, np.asarray(scale)))
    logits = linear(tok, rms_norm(x if every else x[:, -1:], net.norm))
    return mx.array(logits if every else logits[:, 0])


def decode_rows(net: nn.Module, audio: mx.array, tokens: mx.array, caches: list[list[RingKVCache]],
                scales: list[list[mx.array]]) -> mx.array:
    """`net.decode_rows` (`fits`): one position of each of n streams, audio [n, dim], tokens [n],
    each over its own rings and FFN scales -> logits [n, vocab]. The products take all the rows
    at once and give each the bits of its stream's own step (`linear`); the norms, RoPE and
    attention are those of `decode` (and so of `cpu_kernels.layer_step`), row by row."""
    tok = net.embedding_module.tok_embeddings
    scales = [[s if s.dtype == mx.float32 else s.astype(mx.float32) for s in row] for row in scales]
    mx.eval(scales)
    n = len(caches)
    chunks = [_chunk(1, ring, net.layers[0].attention) for ring in caches]
    x = _float32(audio + tok(tokens))[:, None]  # [n, 1, dim]
    for j, block in enumerate(net.layers):
        a = block.attention
        h = rms_norm(x, block.attention_norm)
        q, k, v = linear(a.wq, h), linear(a.wk, h), linear(a.wv, h)
        out = np.empty((n, 1, a.n_heads * a.head_dim), np.float32)
        for i, ring in enumerate(caches):
            at = attend(a, q[i : i + 1], k[i : i + 1], v[i : i + 1], ring[j], *chunks[i])
            out[i] = at.transpose(0, 2, 1, 3).reshape(1, -1)
        x = x + linear(a.wo, out)
        h = np.concatenate([rms_norm(x[i : i + 1], block.ffn_norm, np.asarray(scales[i][j])) for i in range(n)])
        x = x + feed_forward(block.feed_forward, h)
    return mx.array(linear(tok, rms_norm(x, net.norm))[:, 0])


class _StepLayers:
    """`cpu_kernels.StepLayer`s of a transformer's layers (or None), the weights they were made
    of, and the numpy views of its norms and biases that they point to (kept alive with them)."""

    def __init__(self, key: tuple, layers: list[cpu_kernels.StepLayer] | None, views: list[np.ndarray]):
        self.key, self.layers, self.views = key, layers, views


_STEP_PRODUCTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _step_weight(layer: nn.Module) -> tuple | None:
    """What `cpu_kernels.StepWeight.of` takes of a layer whose products of up to MAX_ROWS rows go
    through a row kernel (`q_packed_t`, or `rows_t` for bfloat16 weights of whole multiples of
    32): (weight, parts, float32 bias or None); else None."""
    bias = layer.get("bias")
    if bias is not None and bias.dtype != mx.float32:
        return None
    if isinstance(getattr(layer, "_q", None), cpu_kernels.QPacked):
        return layer._q, 3, bias  # q_packed_t's parts
    w = getattr(layer, "_w", None)
    if isinstance(w, np.ndarray) and cpu_kernels.shapes_fit(*w.shape):
        return w, layer._parts, bias
    return None


def _step_layers(owner: nn.Module, blocks: list[nn.Module]) -> list[cpu_kernels.StepLayer] | None:
    """The layers `blocks` of `owner` (a decoder, an encoder's transformer) for
    `cpu_kernels.layer_step` (a layer's positions in one call), where every product goes through
    a row kernel and the norms and biases are float32; else None. Made once (kept on `owner`),
    and again should a layer or its weights change."""
    def parts(block):  # (items of the modules' dicts: a step checks them all)
        a, f = block["attention"], block["feed_forward"]
        products = [a["wq"], a["wk"], a["wv"], a["wo"], f["w1"], f["w2"], f["w3"]]
        return [*products, *(p.get("bias") for p in products), block["attention_norm"]["weight"],
                block["ffn_norm"]["weight"]]

    key = tuple(part for block in blocks for part in parts(block))
    made = getattr(owner, "_host_step_layers", None)
    if made is not None and len(made.key) == len(key) and all(a is b for a, b in zip(made.key, key)):
        return made.layers
    layers, views = None, []
    if cpu_kernels.library() is not None and all(
            all(_step_weight(p) is not None for p in parts(block)[:7])
            and block.attention_norm.weight.dtype == mx.float32 == block.ffn_norm.weight.dtype for block in blocks):
        layers = []
        for block in blocks:
            a, products = block.attention, parts(block)[:7]
            weights = {}
            for name, product in zip(_STEP_PRODUCTS, products):
                w, n, bias = _step_weight(product)
                if bias is not None:
                    views.append(np.asarray(bias))
                weights[name] = cpu_kernels.StepWeight.of(w, n, None if bias is None else views[-1])
            views += [np.asarray(block.attention_norm.weight), np.asarray(block.ffn_norm.weight)]
            layers.append(cpu_kernels.StepLayer.of(weights, *views[-2:], block.attention_norm.eps, a.n_heads,
                                                   a.n_kv_heads, a.head_dim))
    object.__setattr__(owner, "_host_step_layers", _StepLayers(key, layers, views))
    return layers


def _layer_steps(owner: nn.Module, blocks: list[nn.Module], x: np.ndarray, chunk: tuple) -> list | None:
    """`_step_layers` where this chunk (x [B, L, dim], `_start`'s chunk) can take them: its keys
    written in place and at most MAX_ROWS rows; else None."""
    B, L, _ = x.shape
    return _step_layers(owner, blocks) if chunk[1] and B * L <= cpu_kernels.MAX_ROWS else None


def _layer_step(layer: cpu_kernels.StepLayer, attention: nn.Module, x: np.ndarray, cache: RingKVCache,
                ffn_scale: np.ndarray | None, mask: np.ndarray | None, in_place: bool, cos: np.ndarray,
                sin: np.ndarray):
    """A layer's positions x [B, L, dim] in one call (`cpu_kernels.layer_step`), in place, their
    keys written into the ring first."""
    keys, values, slot = cache.host_slots(x.shape[0], attention.n_kv_heads, attention.head_dim, x.shape[1])
    cpu_kernels.layer_step(layer, x, ffn_scale, cos, sin, keys, values, cache.capacity, slot, cache.stored, mask,
                           attention.scale)
