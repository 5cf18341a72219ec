"""Sliding-window KV cache: a ring of `window` slots written in place, positions never reset."""

from __future__ import annotations

import mlx.core as mx


class RingKVCache:
    """Keys and values of the last `window` positions of one attention layer.

    Position `p` lives in slot `p % window`. Attention is order-free once RoPE is applied,
    so queries read the ring in slot order and a mask built from each slot's position
    enforces the window; a single query over a ring that holds only its window needs none.
    """

    def __init__(self, window: int, step: int = 256):
        self.window = window
        self.step = step
        self.offset = 0
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def stored(self) -> int:
        return min(self.offset, self.window)

    def slot_positions(self) -> mx.array:
        """Absolute position held by each filled slot, in slot order."""
        slots = mx.arange(self.stored)
        if self.offset <= self.window:
            return slots
        return self.offset - self.window + (slots - self.offset) % self.window

    def make_mask(self, n: int) -> mx.array | None:
        """Visibility of [ring slots + n new keys] for n queries at positions offset..offset+n-1."""
        if n == 1:
            return None
        keys = mx.concatenate([self.slot_positions(), mx.arange(self.offset, self.offset + n)])
        queries = mx.arange(self.offset, self.offset + n)[:, None]
        return (keys[None, :] <= queries) & (keys[None, :] > queries - self.window)  # [n, stored + n]

    def _reserve(self, like: mx.array, size: int):
        size = min(self.window, size)
        have = 0 if self.keys is None else self.keys.shape[2]
        if size <= have:
            return
        B, H, _, D = like.shape
        new = min(self.window, max(size, have + self.step))
        pad = mx.zeros((B, H, new - have, D), like.dtype)
        if self.keys is None:
            self.keys, self.values = pad, mx.zeros_like(pad)
        else:
            self.keys = mx.concatenate([self.keys, pad], axis=2)
            self.values = mx.concatenate([self.values, mx.zeros_like(pad)], axis=2)

    def _write(self, k: mx.array, v: mx.array, first: int):
        """Write keys for positions first.. into their slots (at most one wrap)."""
        n = k.shape[2]
        start = first % self.window
        head = min(n, self.window - start)
        self.keys[:, :, start : start + head] = k[:, :, :head]
        self.values[:, :, start : start + head] = v[:, :, :head]
        if head < n:
            self.keys[:, :, : n - head] = k[:, :, head:]
            self.values[:, :, : n - head] = v[:, :, head:]

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store `k, v` [B, H, n, D] and return what the n queries attend over."""
        n = k.shape[2]
        self._reserve(k, self.offset + n)
        if n == 1:
            self._write(k, v, self.offset)
            self.offset += 1
            return self.keys[:, :, : self.stored], self.values[:, :, : self.stored]
        stored = self.stored
        keys = mx.concatenate([self.keys[:, :, :stored], k], axis=2)
        values = mx.concatenate([self.values[:, :, :stored], v], axis=2)
        keep = min(n, self.window)
        self._write(k[:, :, n - keep :], v[:, :, n - keep :], self.offset + n - keep)
        self.offset += n
        return keys, values

    def filter(self, rows: mx.array):
        """Keep only these batch rows."""
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]

    @property
    def state(self):
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
