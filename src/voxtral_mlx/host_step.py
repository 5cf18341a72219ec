"""A decoder step of one position per stream on the CPU, in numpy around `cpu_kernels`.

Where a model's products are CPU kernels on numpy rows (`cpu_quant`, `mkl_bf16`), what MLX
does around them in a step cost a fifth of it: some 15 small graphs per layer (10-80 us per
op on vectors of 3072 values) and a host round trip per product, 30-35 ms of a 4-bit step of
the 4B model on two cores. Here the step runs from the embedding to the logits on numpy
arrays: norms, RoPE, SwiGLU and the residual stream in float32 numpy, the products through
the layers' `host`, attention through `cpu_kernels.attend` over the ring, written in place.
Every operation works row by row, so a stream's numbers do not depend on the streams beside it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels
from .cache import RingKVCache
from .encoder import silu_product


def _products(net: nn.Module) -> list[nn.Module]:
    layers = [net.embedding_module.tok_embeddings]
    for block in net.layers:
        a, f = block.attention, block.feed_forward
        layers += [a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3]
    return layers


def fits(net: nn.Module, caches: list[RingKVCache]) -> bool:
    """Whether `decode` takes a step of `net` over the decoder `caches`: on the CPU, with every
    product of the decoder a kernel on numpy rows (`host`), the attention kernel, float32 rings."""
    args = net.args.decoder
    return (mx.default_device() == mx.cpu and cpu_kernels.attend_fits(args.n_heads, args.n_kv_heads, args.head_dim)
            and all(c.keys is None or c.keys.dtype == mx.float32 for c in caches)
            and all(hasattr(m, "host") for m in _products(net)))


def rotation(position: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [head_dim / 2] float32 of RoPE's angles `position * theta^(-2d / head_dim)`."""
    angles = position * theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Interleaved pairs `(x[2d], x[2d + 1])` of x [..., head_dim] rotated."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rms_norm(x: np.ndarray, norm: nn.RMSNorm) -> np.ndarray:
    mean = np.mean(np.square(x), axis=-1, keepdims=True)
    return x * (np.float32(1) / np.sqrt(mean + np.float32(norm.eps))) * np.asarray(norm.weight)


def attention(layer: nn.Module, h: np.ndarray, cache: RingKVCache, visible: np.ndarray | None,
              cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    B = h.shape[0]
    q = rope(layer.wq.host(h).reshape(B, layer.n_heads, layer.head_dim), cos, sin)
    k = rope(layer.wk.host(h).reshape(B, layer.n_kv_heads, layer.head_dim), cos, sin)
    v = layer.wv.host(h).reshape(B, layer.n_kv_heads, layer.head_dim)
    keys, values = cache.write_host(k, v)
    out = cpu_kernels.attend(q[:, :, None], keys, values, cache.stored, visible, layer.scale)  # [B, H, 1, D]
    return layer.wo.host(out.reshape(B, -1))


def decode(net: nn.Module, audio: mx.array, tokens: mx.array, caches: list[RingKVCache],
           scales: list[mx.array]) -> mx.array:
    """`net.decode` of one position per stream (`fits`): audio [B, 1, dim], tokens [B, 1] -> [B, vocab]."""
    tok = net.embedding_module.tok_embeddings
    mask = caches[0].make_mask(1)
    x = (audio[:, 0] + tok(tokens[:, 0])).astype(mx.float32)
    scales = [s if s.dtype == mx.float32 else s.astype(mx.float32) for s in scales]
    mx.eval(x, *scales, *([] if mask is None else [mask]))
    x = np.asarray(x)  # [B, dim]
    visible = None if mask is None else np.asarray(mask).reshape(-1)
    args = net.args.decoder
    cos, sin = rotation(caches[0].offset, args.head_dim, args.rope_theta)
    for block, cache, scale in zip(net.layers, caches, scales):
        x = x + attention(block.attention, rms_norm(x, block.attention_norm), cache, visible, cos, sin)
        ff = block.feed_forward
        h = rms_norm(x, block.ffn_norm) * np.asarray(scale)
        x = x + ff.w2.host(silu_product(ff.w1.host(h), ff.w3.host(h)))
    return mx.array(tok.host(rms_norm(x, net.norm)))
