"""Sliding-window KV cache: a ring of slots written in place, positions never reset."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class RingKVCache:
    """Keys and values of the last `window` positions of one attention layer.

    Position `p` lives in slot `p % capacity`. Attention is order-free once RoPE is applied,
    so queries read the ring in slot order and a mask built from each slot's position
    enforces the window; a single query over a ring that holds only its window needs none.

    `spare` slots beyond the window make `rollback` possible: positions written and then
    taken back (a rejected speculative pass) overwrote only positions that no later query
    sees, as long as no more than `spare` are taken back at once.
    """

    def __init__(self, window: int, step: int = 256, spare: int = 0):
        self.window = window
        self.spare = spare
        self.capacity = window + spare
        self.step = step
        self.expected = 0  # slots the first allocation takes at least (`expect`)
        self.offset = 0
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def stored(self) -> int:
        return min(self.offset, self.capacity)

    def slot_positions(self, offset: int | None = None) -> mx.array:
        """Absolute position held by each filled slot, in slot order (at `offset`, default now).

        After a rollback, a slot that holds a position taken back counts as holding the one
        `capacity` earlier, which is out of every later query's window.
        """
        offset = self.offset if offset is None else offset
        slots = mx.arange(min(offset, self.capacity))
        if offset <= self.capacity:
            return slots
        return offset - self.capacity + (slots - offset) % self.capacity

    def make_mask(self, n: int) -> mx.array | None:
        """Visibility of what `update_and_fetch` returns for n queries at positions offset..offset+n-1:
        [ring slots + n new keys], or for one query the ring after its write."""
        if n == 1:
            if self.spare == 0 or self.offset + 1 <= self.window:
                return None
            return (self.slot_positions(self.offset + 1) > self.offset - self.window)[None]  # [1, stored]
        return self._visible(mx.concatenate([self.slot_positions(), mx.arange(self.offset, self.offset + n)]), n)

    def ring_mask(self, n: int) -> mx.array:
        """Visibility [n, stored] of the ring's slots to n queries at positions offset..offset+n-1,
        once their keys are written in place (`fits_in_place(n)`)."""
        return self._visible(self.slot_positions(self.offset + n), n)

    def _visible(self, keys: mx.array, n: int) -> mx.array:
        """[n, len(keys)]: which key positions each of n queries from `offset` on sees."""
        queries = mx.arange(self.offset, self.offset + n)[:, None]
        return (keys[None, :] <= queries) & (keys[None, :] > queries - self.window)

    def expect(self, positions: int):
        """Size the ring for `positions` in all when it is first written (at most its capacity):
        growing it 256 slots at a time copies what it holds each time."""
        self.expected = min(self.capacity, positions)

    def _reserve(self, like: mx.array | tuple, size: int):
        """Room for `size` slots of keys shaped like `like` [B, H, n, D] (an array, or the
        (B, H, D) of float32 keys)."""
        size = min(self.capacity, size)
        have = 0 if self.keys is None else self.keys.shape[2]
        if size <= have:
            return
        (B, H, D), dtype = ((like.shape[0], like.shape[1], like.shape[3]), like.dtype) if isinstance(like, mx.array) \
            else (like, mx.float32)
        new = min(self.capacity, self.expected if size <= self.expected else max(size, have + self.step))
        pad = mx.zeros((B, H, new - have, D), dtype)
        if self.keys is None:
            self.keys, self.values = pad, mx.zeros_like(pad)
        else:
            self.keys = mx.concatenate([self.keys, pad], axis=2)
            self.values = mx.concatenate([self.values, mx.zeros_like(pad)], axis=2)

    def _write(self, k: mx.array, v: mx.array, first: int):
        """Write keys for positions first.. into their slots (at most one wrap)."""
        n = k.shape[2]
        start = first % self.capacity
        head = min(n, self.capacity - start)
        self.keys[:, :, start : start + head] = k[:, :, :head]
        self.values[:, :, start : start + head] = v[:, :, :head]
        if head < n:
            self.keys[:, :, : n - head] = k[:, :, head:]
            self.values[:, :, : n - head] = v[:, :, head:]

    def fits_in_place(self, n: int) -> bool:
        """Whether n new positions can be written before their queries read the ring: the
        oldest key the first of them sees must survive the writes of the last."""
        return n <= self.spare + 1

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write `k, v` [B, H, n, D] into their slots (`fits_in_place(n)`); return the filled
        ring, which `kernels.ring_attention` reads in place."""
        n = k.shape[2]
        self._reserve(k, self.offset + n)
        self._write(k, v, self.offset)
        self.offset += n
        return self.keys[:, :, : self.stored], self.values[:, :, : self.stored]

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
        keep = min(n, self.capacity)
        self._write(k[:, :, n - keep :], v[:, :, n - keep :], self.offset + n - keep)
        self.offset += n
        return keys, values

    def host_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The ring as numpy views of its memory, evaluated and C-contiguous, for the CPU kernels
        that read it and `write_host`."""
        mx.eval(self.keys, self.values)
        keys, values = np.asarray(self.keys), np.asarray(self.values)
        if not (keys.flags.c_contiguous and values.flags.c_contiguous):
            # A write that covered the whole ring left it a strided view of the written keys: copy it
            # once into a ring of its own, which later writes update in place.
            self.keys, self.values = mx.contiguous(self.keys), mx.contiguous(self.values)
            mx.eval(self.keys, self.values)
            keys, values = np.asarray(self.keys), np.asarray(self.values)
        return keys, values

    def write_host(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`update_and_fetch`'s write, through numpy views of the ring, in place: float32 `k, v`
        [B, H, n, D]; returns the views (`host_arrays`). Everything MLX computes from the ring
        must have been evaluated."""
        B, H, n, D = k.shape
        keys, values, slot = self.host_slots(B, H, D, n)
        keep = min(n, self.capacity)
        start = (slot + n - keep) % self.capacity
        head = min(keep, self.capacity - start)
        for ring, new in ((keys, k), (values, v)):
            ring[:, :, start : start + head] = new[:, :, n - keep : n - keep + head]
            ring[:, :, : keep - head] = new[:, :, n - keep + head :]
        return keys, values

    def host_slots(self, batch: int, heads: int, head_dim: int, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Room for n positions of float32 keys [batch, heads, n, head_dim] that the caller
        writes itself into slots (slot + i) % capacity of the returned numpy views of the ring
        (`host_arrays`): (keys, values, slot). The positions count as written."""
        self._reserve((batch, heads, head_dim), self.offset + n)
        keys, values = self.host_arrays()
        slot = self.offset % self.capacity
        self.offset += n
        return keys, values, slot

    def rollback(self, n: int):
        """Take back the last n positions written (at most `spare`)."""
        if not 0 <= n <= min(self.spare, self.offset):
            raise ValueError(f"cannot take back {n} positions: {self.spare} spare slots, {self.offset} written")
        self.offset -= n

    def snapshot(self) -> tuple[int, mx.array, mx.array]:
        """(offset, keys, values): what later queries can still see, the last `window` positions
        [B, H, n, D] in position order, copied out of the ring (which is written in place)."""
        n = min(self.offset, self.window)
        slots = mx.array([p % self.capacity for p in range(self.offset - n, self.offset)])
        keys, values = mx.take(self.keys, slots, axis=2), mx.take(self.values, slots, axis=2)
        mx.eval(keys, values)
        return self.offset, keys, values

    def restore(self, snapshot: tuple[int, mx.array, mx.array], batch_size: int):
        """Take a new ring's state from `snapshot` (of a ring of the same window, one batch
        row), copied into each of `batch_size` rows."""
        offset, keys, values = snapshot
        B, H, n, D = keys.shape
        keys, values = (mx.broadcast_to(a, (batch_size, H, n, D)) for a in (keys, values))
        self._reserve(keys, offset)
        self._write(keys, values, offset - n)
        self.offset = offset
        mx.eval(self.keys, self.values)

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
