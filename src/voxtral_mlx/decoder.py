"""The text decoder: GQA transformer with delay-conditioned FFN norms (MODEL.md section 6)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import RingKVCache
from .config import DecoderArgs
from .encoder import GELU, Attention, FeedForward


class DecoderBlock(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.attention = Attention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim,
                                   args.rope_theta, biases=False)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, bias=False)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        cond = args.ada_rms_norm_t_cond_dim
        self.ada_rms_norm_t_cond = [nn.Linear(args.dim, cond, bias=False), GELU(),
                                    nn.Linear(cond, args.dim, bias=False)]

    def ffn_scale(self, t_cond: mx.array) -> mx.array:
        """`1 + s_l`: the constant FFN-norm scale for one delay."""
        down, act, up = self.ada_rms_norm_t_cond
        return 1.0 + up(act(down(t_cond)))

    def __call__(self, x: mx.array, mask: mx.array | None, cache: RingKVCache, scale: mx.array) -> mx.array:
        x = x + self.attention(self.attention_norm(x), mask, cache)
        return x + self.feed_forward(self.ffn_norm(x) * scale)

    def rows(self, x: mx.array, caches: list[RingKVCache], scales: mx.array) -> mx.array:
        """One position of each of n streams x [n, 1, dim], each with its ring and scale [n, 1, dim]."""
        x = x + self.attention.rows(self.attention_norm(x), caches)
        return x + self.feed_forward(self.ffn_norm(x) * scales)


def delay_embedding(n_delay: int, dim: int) -> mx.array:
    """`[cos(n f), sin(n f)]` with `f_i = 10000^(-i / (dim/2))`."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
    angles = n_delay * freqs
    return mx.concatenate([mx.cos(angles), mx.sin(angles)])
