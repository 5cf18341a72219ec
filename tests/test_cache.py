"""The ring KV cache against attention over the full history with an explicit window."""

import math

import mlx.core as mx
import numpy as np
import pytest

from voxtral_mlx.cache import RingKVCache


def windowed_attention(q, k, v, window):
    """Numpy float64: query i (at position i of the full sequence) sees keys i-window+1..i."""
    n = q.shape[2]
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    pos = np.arange(n)
    visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("chunks", [[1] * 40, [3, 1, 1, 7, 2, 1, 20, 1, 5], [40], [17, 17, 1, 1, 4]])
def test_chunked_attention_matches_full_history(window, chunks):
    rng = np.random.default_rng(window)
    n = sum(chunks)
    q, k, v = (rng.normal(size=(1, 2, n, 8)) * 2 for _ in range(3))
    expected = windowed_attention(q, k, v, window)
    cache = RingKVCache(window, step=4)
    start, outs = 0, []
    for c in chunks:
        sl = slice(start, start + c)
        mask = cache.make_mask(c)
        keys, values = cache.update_and_fetch(mx.array(k[:, :, sl], mx.float32), mx.array(v[:, :, sl], mx.float32))
        out = mx.fast.scaled_dot_product_attention(mx.array(q[:, :, sl], mx.float32), keys, values,
                                                   scale=1 / math.sqrt(8), mask=mask)
        outs.append(np.array(out))
        start += c
    np.testing.assert_allclose(np.concatenate(outs, axis=2), expected, atol=2e-5)
    assert cache.offset == n
    assert cache.keys.shape[2] == min(window, n)


def test_ring_never_grows_past_the_window():
    cache = RingKVCache(6, step=4)
    for _ in range(50):
        cache.update_and_fetch(mx.zeros((1, 1, 1, 2)), mx.zeros((1, 1, 1, 2)))
    assert cache.keys.shape == (1, 1, 6, 2)
    assert cache.offset == 50
    assert sorted(np.array(cache.slot_positions()).tolist()) == list(range(44, 50))


def test_a_ring_expecting_its_positions_is_allocated_once():
    grown = []
    for expected, writes, sizes in ((30, [1] * 30, [30]), (100, [7, 1, 40], [64]), (10, [4, 4, 4], [10, 14])):
        cache = RingKVCache(60, step=4, spare=4)
        cache.expect(expected)
        for n in writes:
            cache.update_and_fetch(mx.zeros((1, 2, n, 8)), mx.zeros((1, 2, n, 8)))
            if not grown or cache.keys.shape[2] != grown[-1]:
                grown.append(cache.keys.shape[2])
        # At most its capacity (60 + 4); past what was expected it grows `step` slots at a time.
        assert grown == sizes, (expected, writes)
        grown.clear()


def test_host_slots_give_the_ring_to_write_in_place_and_count_the_positions():
    ring = RingKVCache(window=6, step=4, spare=2)  # 8 slots, allocated 4 at a time
    slots = []
    for n in (3, 2, 1, 3, 2):
        keys, values, slot = ring.host_slots(2, 3, 16, n)
        assert keys.shape == values.shape and keys.shape[:2] == (2, 3) and keys.shape[3] == 16
        assert keys.dtype == np.float32 and keys.flags.c_contiguous and keys.flags.writeable
        assert all((slot + i) % ring.capacity < keys.shape[2] for i in range(n))  # room for all of them
        keys[:, :, [(slot + i) % ring.capacity for i in range(n)]] = 1.0
        slots.append(slot)
    assert slots == [0, 3, 5, 6, 1] and ring.offset == 11 and ring.stored == 8
    assert np.array_equal(np.array(ring.keys), keys) and np.all(keys == 1)  # written in the ring's own memory
