"""The causal audio encoder: conv stem and sliding-window transformer (MODEL.md section 4)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels, host, kernels
from .cache import RingKVCache
from .config import AudioArgs, EncoderArgs


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, interleaved RoPE and a ring cache."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float,
                 biases: bool):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.scale = 1.0 / math.sqrt(head_dim)
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=biases)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=biases)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=biases)

    def __call__(self, x: mx.array, mask: mx.array | None, cache: RingKVCache) -> mx.array:
        B, L, _ = x.shape
        out = self.attend(*self.project(x), mask, cache)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def rows(self, x: mx.array, caches: list[RingKVCache]) -> mx.array:
        """One position of each of n streams [n, 1, dim], each with its ring (at a position of its own)."""
        q, k, v = self.project(x)
        out = mx.concatenate([self.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], cache.make_mask(1), cache)
                              for i, cache in enumerate(caches)])
        return self.wo(out.transpose(0, 2, 1, 3).reshape(x.shape[0], 1, -1))

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values [B, heads, L, head_dim] of x [B, L, dim], before RoPE."""
        B, L, _ = x.shape
        q = self.wq(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.wk(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return q, k, v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, cache: RingKVCache) -> mx.array:
        """RoPE at the ring's position, the keys and values written, and the queries' attention
        [B, heads, L, head_dim]."""
        L = q.shape[2]
        q = mx.fast.rope(q, self.head_dim, traditional=True, base=self.rope_theta, scale=1.0, offset=cache.offset)
        k = mx.fast.rope(k, self.head_dim, traditional=True, base=self.rope_theta, scale=1.0, offset=cache.offset)
        if cache.fits_in_place(L) and kernels.use_kernel(L, min(cache.offset + L, cache.capacity), self.head_dim):
            k, v = cache.append(k, v)
            out = kernels.ring_attention(q, k, v, last=cache.offset - 1, capacity=cache.capacity,
                                         window=cache.window, scale=self.scale)
        else:
            k, v = cache.update_and_fetch(k, v)
            if through_numpy(L):
                out = numpy_attention(q, k, v, mask, self.scale)
            elif L == 1 and through_kernel(cache, self.n_heads, self.n_kv_heads, self.head_dim):
                out = kernel_attention(q, cache, mask, self.scale)
            else:
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return out


# Several rows at once (the encoder's chunks, the prompt, speculative passes) on the CPU take
# their attention and SwiGLU through numpy, the attention through `cpu_kernels.attend` where
# it runs: MLX's CPU exponential is scalar code, and its attention over long chunks several
# times slower than numpy's (on a 2-core Xeon, 512 random frames over 1262 keys, 32 heads:
# 1970 ms against 170 ms; a 5 s clip's encoder chunk end to end 10.2 s against 8.9 s).
NUMPY_ROWS = 2


def through_numpy(rows: int) -> bool:
    return rows >= NUMPY_ROWS and mx.default_device() == mx.cpu


def numpy_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, scale: float) -> mx.array:
    """Softmax attention of q [B, H, L, D] over k, v [B, Hk, S, D] (query head h reads kv head
    h // (H / Hk)) in float32 on the host (`cpu_kernels.attend` where it runs, else numpy);
    mask [L, S] True where visible, or None."""
    q32, k32, v32 = (a.astype(mx.float32) for a in (q, k, v))
    mx.eval(q32, k32, v32, *([] if mask is None else [mask]))
    out = host.attention_chunk(np.asarray(q32), np.asarray(k32), np.asarray(v32),
                               None if mask is None else np.asarray(mask), scale)
    return mx.array(out).astype(q.dtype)


ATTEND_MIN = 1 << 16  # multiply-adds below which MLX's attention, which needs no host round trip, is cheaper


def through_kernel(cache: RingKVCache, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether a decoder step's attention over a float32 cache goes through `cpu_kernels.attend`
    (the CPU, AVX-512): 2-3x MLX's on long caches (26 layers over a full 8192-position window,
    two cores: 130-140 ms per step against 470). The 4B model takes it from 8 cached positions."""
    work = 2 * cache.keys.shape[0] * heads * cache.stored * head_dim
    return (work >= ATTEND_MIN and mx.default_device() == mx.cpu and cache.keys.dtype == mx.float32
            and cpu_kernels.attend_fits(heads, kv_heads, head_dim))


def kernel_attention(q: mx.array, cache: RingKVCache, mask: mx.array | None, scale: float) -> mx.array:
    """One position's attention (q [B, H, 1, D]) over the filled slots of `cache`, read in place;
    mask [1, stored] True where visible, or None."""
    q32 = q.astype(mx.float32)
    mx.eval(q32, cache.keys, cache.values, *([] if mask is None else [mask]))
    keys, values = cache.host_arrays()
    out = cpu_kernels.attend(np.ascontiguousarray(q32), keys, values, cache.stored,
                             None if mask is None else np.asarray(mask).reshape(-1), scale)
    return mx.array(out).astype(q.dtype)


def silu(x: mx.array) -> mx.array:
    """`x * sigmoid(x)`, uncompiled: not `mlx.nn.silu` (nor `mlx.nn.gelu`, `mlx.nn.GELU`), which
    `mx.compile` wraps. MLX keeps what a thread compiled in that thread's storage, freed (taking
    the GIL) as the thread ends; a thread that had run the model and ended while the interpreter
    was finalizing (the server's worker after Ctrl+C) aborted the process ("terminate called
    without an active exception")."""
    return x * mx.sigmoid(x)


def gelu(x: mx.array) -> mx.array:
    """The exact GELU, `x * Phi(x)` (see `silu` for why not `mlx.nn.gelu`)."""
    return x * (1 + mx.erf(x / math.sqrt(2))) / 2


class GELU(nn.Module):
    """`gelu` as a layer, for the adapter and the delay conditioning (not `mlx.nn.GELU`: see `silu`)."""

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(x)


def numpy_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """`silu(gate) * up` in float32 numpy: MLX's CPU sigmoid is scalar, 6x slower on the
    encoder's chunks (376 frames x 5120: 50 ms against 8.5 ms, every layer)."""
    g32, u32 = gate.astype(mx.float32), up.astype(mx.float32)
    mx.eval(g32, u32)
    return mx.array(host.silu_product(np.asarray(g32), np.asarray(u32))).astype(gate.dtype)


class FeedForward(nn.Module):
    """SwiGLU: `(silu(x W1) * (x W3)) W2`."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if through_numpy(x.size // x.shape[-1]):
            return self.w2(numpy_swiglu(self.w1(x), self.w3(x)))
        return self.w2(silu(self.w1(x)) * self.w3(x))


class EncoderBlock(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.attention = Attention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim,
                                   args.rope_theta, biases=args.use_biases)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, bias=args.use_biases)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None, cache: RingKVCache) -> mx.array:
        x = x + self.attention(self.attention_norm(x), mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class EncoderTransformer(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.layers = [EncoderBlock(args) for _ in range(args.n_layers)]
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, x: mx.array, caches: list[RingKVCache]) -> mx.array:
        if host.fits(self.layers, caches):
            return host.encode(self, x, caches)
        mask = caches[0].make_mask(x.shape[1])
        for layer, cache in zip(self.layers, caches):
            x = layer(x, mask, cache)
        return self.norm(x)


class CausalConv(nn.Module):
    """A conv1d whose left context comes from the carried tail of the previous chunk."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    @property
    def tail(self) -> int:
        """Input frames before a chunk that its first output reads (the causal left pad)."""
        return self.conv.weight.shape[1] - self.conv.stride

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(self.conv(x))


class StemState:
    """The conv stem's carried inputs; zeros before the first frame, as the causal left pad."""

    def __init__(self, tails: list[mx.array]):
        self.tails = tails

    def filter(self, rows: mx.array):
        self.tails = [t[rows] for t in self.tails]


class WhisperEncoder(nn.Module):
    def __init__(self, args: EncoderArgs, audio: AudioArgs):
        super().__init__()
        n_mels = args.audio_encoding_args.num_mel_bins
        self.conv_layers = [CausalConv(n_mels, args.dim, stride=1),
                            CausalConv(args.dim, args.dim, stride=audio.mel_per_token // audio.frames_per_token)]
        self.transformer = EncoderTransformer(args)
        self.window = args.sliding_window

    def make_stem_state(self, dtype: mx.Dtype, batch_size: int = 1) -> StemState:
        return StemState([mx.zeros((batch_size, c.tail, c.conv.weight.shape[2]), dtype) for c in self.conv_layers])

    def make_cache(self, spare: int = 0) -> list[RingKVCache]:
        return [RingKVCache(self.window, spare=spare) for _ in self.transformer.layers]

    def __call__(self, mel: mx.array, stem: StemState, caches: list[RingKVCache]) -> mx.array:
        """Encoder frames for consecutive mel frames [B, T, n_mels] -> [B, T / stride, dim]."""
        x = mel
        # On the CPU each stream's convolution runs alone: the BLAS behind MLX's (MKL) can sum a
        # product in an order that depends on its rows, and a stream's numbers must not depend
        # on the streams beside it.
        apart = x.shape[0] > 1 and mx.default_device() == mx.cpu
        for i, conv in enumerate(self.conv_layers):
            x = mx.concatenate([stem.tails[i], x], axis=1)
            stem.tails[i] = x[:, x.shape[1] - conv.tail :]
            x = mx.concatenate([conv(x[b : b + 1]) for b in range(x.shape[0])]) if apart else conv(x)
        return self.transformer(x, caches)
