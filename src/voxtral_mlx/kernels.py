"""Attention over a ring KV cache: a pure-MLX reference, Metal kernels, and the dispatcher.

A ring of `capacity` slots holds the keys and values of the last `capacity` positions:
slot `s` holds position `p(s) = last - ((last - s) mod capacity)` (never written when
negative). The query at position `t` sees the slots with `t - window < p(s) <= t`. The
kernels (`kernels/*.metal` in the repository, `voxtral_mlx/kernel_sources/` in the wheel) read the
ring in place and let the query heads that share a kv head read each key once.

`ring_attention` runs the kernels only on a Metal GPU and only where they were measured
faster than the reference (`KERNEL_WINS`); `VOXTRAL_MLX_KERNELS=on|off|auto` overrides that.
"""

from __future__ import annotations

import os
import struct
from functools import lru_cache
from importlib import resources
from pathlib import Path

import mlx.core as mx

ENV = "VOXTRAL_MLX_KERNELS"
DTYPES = (mx.float32, mx.float16, mx.bfloat16)

# Where the kernels beat the reference in `benchmarks/kernels.py` on Apple silicon, as
# (head dim, at most this many queries, at least this many ring slots). Empty until someone
# runs the benchmark on a Mac and fills it in: until then "auto" means the reference.
KERNEL_WINS: tuple[tuple[int, int, int], ...] = ()


def ring_positions(last: int, capacity: int, slots: int) -> mx.array:
    """Absolute position held by each of the first `slots` ring slots (negative: unwritten)."""
    return last - (last - mx.arange(slots)) % capacity


def ring_mask(n: int, last: int, capacity: int, window: int, slots: int) -> mx.array:
    """[n, slots] visibility of each slot to the n queries at positions last-n+1 .. last."""
    p = ring_positions(last, capacity, slots)[None]
    t = mx.arange(last - n + 1, last + 1)[:, None]
    return (p >= 0) & (p <= t) & (p > t - window)


def ring_attention_reference(q: mx.array, keys: mx.array, values: mx.array, *, last: int, capacity: int,
                             window: int, scale: float) -> mx.array:
    """Attention of n queries over a ring KV cache, in plain MLX: a mask and the fused SDPA.

    Args:
        q: [B, Hq, n, D], the queries at positions `last-n+1 .. last`, RoPE applied.
        keys, values: [B, Hk, S, D], the first S <= capacity slots of the ring; Hq % Hk == 0
            and query head h uses kv head h // (Hq // Hk).
        last: position of the last query (the newest key).
        capacity: slots in the ring, >= window (more leaves room to roll back).
        window: a query at t sees positions t-window+1 .. t.
        scale: multiplies the scores, usually 1/sqrt(D).

    Returns [B, Hq, n, D] in q's dtype. Every query must see at least one key (its own
    position, written before attention, is enough).
    """
    n, S = q.shape[2], keys.shape[2]
    # One query over written slots of a ring no longer than the window sees them all.
    everything = n == 1 and S <= last + 1 and capacity <= window
    mask = None if everything else ring_mask(n, last, capacity, window, S)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)


def kernel_dir() -> Path:
    """Where the kernel sources are: in the installed package, else in the source checkout
    (an editable install imports the package from src/ and has no copy)."""
    packaged = resources.files("voxtral_mlx") / "kernel_sources"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "kernels"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"Kernel sources not found in {packaged} or {checkout}; reinstall voxtral-mlx")


def kernel_source(name: str) -> str:
    return (kernel_dir() / name).read_text()


class RingAttentionKernels:
    """The ring attention kernels, built once: a one-pass kernel, and for long rings a pass
    over `blocks` runs of keys per tile with a pass that merges them.

    Args:
        metal_kernel: `mx.fast.metal_kernel` (the default) or a stand-in with its interface
            (the tests' CPU emulator).
        simdgroups: simdgroups per threadgroup (raised to D/32 where needed).
        block_keys: a tile that sees more key positions than this splits them into blocks.
        max_blocks: most blocks per tile.
    """

    def __init__(self, metal_kernel=None, simdgroups: int = 8, block_keys: int = 1024, max_blocks: int = 32):
        make = metal_kernel or mx.fast.metal_kernel
        header = kernel_source("ring_attention_header.metal")
        inputs = ["q", "keys", "values", "params"]
        self.one_pass = make(name="voxtral_ring_attention", input_names=inputs, output_names=["out"],
                             source=kernel_source("ring_attention.metal"), header=header,
                             ensure_row_contiguous=False)
        self.split = make(name="voxtral_ring_attention_split", input_names=inputs,
                          output_names=["o_part", "ml_part"], source=kernel_source("ring_attention_split.metal"),
                          header=header, ensure_row_contiguous=False)
        self.reduce = make(name="voxtral_ring_attention_reduce", input_names=["o_part", "ml_part"],
                           output_names=["out"], source=kernel_source("ring_attention_reduce.metal"))
        self.simdgroups = simdgroups
        self.block_keys = block_keys
        self.max_blocks = max_blocks

    @staticmethod
    def supports(q: mx.array, keys: mx.array) -> bool:
        D = q.shape[-1]
        return q.dtype in DTYPES and keys.dtype == q.dtype and D % 32 == 0 and D <= 256

    def blocks(self, n: int, slots: int, last: int, capacity: int, window: int) -> int:
        """Blocks per tile for the split pass: 1 (one pass) unless a tile sees many keys."""
        span = min(window + n - 1, capacity, slots, last + 1)
        return max(1, min(self.max_blocks, -(-span // self.block_keys)))

    def __call__(self, q: mx.array, keys: mx.array, values: mx.array, *, last: int, capacity: int, window: int,
                 scale: float, blocks: int | None = None) -> mx.array:
        """As `ring_attention_reference`; `blocks` forces the number of key blocks."""
        B, Hq, n, D = q.shape
        _, Hk, S, _ = keys.shape
        if not self.supports(q, keys) or Hq % Hk or values.shape != keys.shape or S > capacity:
            raise ValueError(f"ring attention kernel: unsupported q {q.shape} {q.dtype}, keys {keys.shape} "
                             f"{keys.dtype}, values {values.shape} (capacity {capacity})")
        if blocks is None:
            blocks = self.blocks(n, S, last, capacity, window)
        G = Hq // Hk
        rows = 4 if G * n <= 4 else 8  # rows per tile: each lane keeps R query and output rows in registers
        tiles = (G * n + rows - 1) // rows
        bn = max(self.simdgroups, D // 32)
        scale_bits = struct.unpack("<i", struct.pack("<f", scale))[0]
        params = mx.array([last, capacity, window, blocks, scale_bits], dtype=mx.int32)
        template = [("T", q.dtype), ("D", D), ("R", rows), ("BN", bn)]
        grid = (32 * bn * tiles, Hk, B * blocks)
        if blocks == 1:
            return self.one_pass(inputs=[q, keys, values, params], template=template, grid=grid,
                                 threadgroup=(32 * bn, 1, 1), output_shapes=[q.shape], output_dtypes=[q.dtype])[0]
        o_part, ml_part = self.split(
            inputs=[q, keys, values, params], template=template, grid=grid, threadgroup=(32 * bn, 1, 1),
            output_shapes=[(B, Hq, n, blocks, D), (B, Hq, n, blocks, 2)], output_dtypes=[mx.float32, mx.float32])
        return self.reduce(inputs=[o_part, ml_part], template=[("T", q.dtype)], grid=(D, B * Hq * n, 1),
                           threadgroup=(D, 1, 1), output_shapes=[q.shape], output_dtypes=[q.dtype])[0]


@lru_cache(maxsize=1)
def metal_kernels() -> RingAttentionKernels:
    return RingAttentionKernels()


def kernel_mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"{ENV}={mode!r}: use on, off or auto")
    return mode


def metal_ready() -> bool:
    """Metal is there and MLX computes on the GPU by default."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def enabled() -> bool:
    """Whether `use_kernel` may say yes on this machine (caches then keep spare slots, so that
    whole passes read the ring in place)."""
    mode = kernel_mode()
    return mode == "on" or (mode == "auto" and bool(KERNEL_WINS) and metal_ready())


def use_kernel(n: int, slots: int, head_dim: int) -> bool:
    """Whether `ring_attention` takes the kernel for n queries over `slots` ring slots."""
    mode = kernel_mode()
    if mode == "off":
        return False
    if mode == "on":
        if not metal_ready():
            raise RuntimeError(f"{ENV}=on needs Metal and the GPU as MLX's default device, which this "
                               f"machine does not have; set {ENV}=auto (the default) or off")
        return True
    return metal_ready() and any(head_dim == d and n <= most and slots >= least for d, most, least in KERNEL_WINS)


def ring_attention(q: mx.array, keys: mx.array, values: mx.array, *, last: int, capacity: int, window: int,
                   scale: float) -> mx.array:
    """Attention of n queries over a ring KV cache (see `ring_attention_reference`): the Metal
    kernels where they are faster (or forced with VOXTRAL_MLX_KERNELS=on), else the reference."""
    if use_kernel(q.shape[2], keys.shape[2], q.shape[3]) and RingAttentionKernels.supports(q, keys):
        return metal_kernels()(q, keys, values, last=last, capacity=capacity, window=window, scale=scale)
    return ring_attention_reference(q, keys, values, last=last, capacity=capacity, window=window, scale=scale)
