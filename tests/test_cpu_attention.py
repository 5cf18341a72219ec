"""The attention kernels on the CPU: decoder steps' (kernels/cpu_rows.c `attend`,
cpu_kernels.attend, encoder.kernel_attention) and many positions' (`attend_many`: prompts,
encoder chunks)."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import checkpoint, forced_logits, load_mlx, load_model, speech

from voxtral_mlx import cpu_kernels, encoder, host
from voxtral_mlx.cache import RingKVCache

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None,
                                  reason=f"the attention kernel is not available: {cpu_kernels.reason}")


def reference(q, keys, values, stored, mask, scale):
    """float64 softmax attention of q [B, H, 1, D] over the first `stored` slots."""
    B, H, _, D = q.shape
    Hk = keys.shape[1]
    k = np.repeat(keys[:, :, :stored].astype(np.float64), H // Hk, axis=1)
    v = np.repeat(values[:, :, :stored].astype(np.float64), H // Hk, axis=1)
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) * np.float64(np.float32(scale))
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v, np.abs(s[np.isfinite(s)]).max()


def case(rng, B, H, Hk, D, capacity, stored, masked):
    q = rng.normal(size=(B, H, 1, D)).astype(np.float32)
    keys, values = (rng.normal(size=(B, Hk, capacity, D)).astype(np.float32) for _ in range(2))
    mask = rng.random(stored) > 0.4 if masked else None
    if masked:
        mask[rng.integers(stored)] = True
    return q, keys, values, mask


@needs_kernel
@pytest.mark.parametrize("B,H,Hk,D,capacity,stored", [(1, 4, 2, 16, 20, 1), (1, 4, 2, 16, 20, 17),
                                                      (2, 32, 8, 128, 300, 257), (3, 5, 1, 64, 40, 40),
                                                      (1, 6, 3, 48, 1100, 1029)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_is_the_exact_softmax_within_float32(B, H, Hk, D, capacity, stored, masked):
    rng = np.random.default_rng(B * H + D + stored)
    q, keys, values, mask = case(rng, B, H, Hk, D, capacity, stored, masked)
    q *= 2  # peaked scores: the exponentials span a wide range
    got = cpu_kernels.attend(q, keys, values, stored, mask, 0.3)
    assert got.shape == q.shape and got.dtype == np.float32
    want, top = reference(q, keys, values, stored, mask, 0.3)
    # A score s carries a float32 error of about 1e-7 |s|, which its weight e^s turns into a
    # relative error of the same size: the bound grows with the largest score (about 20 here).
    assert np.abs(got - want).max() < 2e-7 * (1 + top)


@needs_kernel
@pytest.mark.parametrize("B,H,Hk,L,D,capacity,stored", [(1, 4, 4, 4, 64, 40, 33), (2, 32, 8, 16, 128, 300, 257),
                                                        (1, 3, 1, 21, 16, 30, 30)])
def test_several_positions_each_see_their_own_slots(B, H, Hk, L, D, capacity, stored):
    rng = np.random.default_rng(L)
    q = rng.normal(size=(B, H, L, D)).astype(np.float32)
    keys, values = (rng.normal(size=(B, Hk, capacity, D)).astype(np.float32) for _ in range(2))
    mask = rng.random((L, stored)) > 0.3
    mask[np.arange(L), rng.integers(stored, size=L)] = True
    got = cpu_kernels.attend(q, keys, values, stored, mask, 0.3)
    assert got.shape == q.shape
    for position in range(L):
        want, top = reference(q[:, :, position : position + 1], keys, values, stored, mask[position], 0.3)
        assert np.abs(got[:, :, position : position + 1] - want).max() < 2e-7 * (1 + top)
    most = 64 // (H // Hk)  # queries per key head
    assert cpu_kernels.attend_fits(H, Hk, D, most) and not cpu_kernels.attend_fits(H, Hk, D, most + 1)


@needs_kernel
def test_scores_far_below_the_top_weigh_nothing():
    # exp underflows to 0 below -87.3: a key 1000 below the best must not count, nor NaN.
    q = np.zeros((1, 2, 1, 16), np.float32)
    q[..., 0] = 1
    keys = np.zeros((1, 1, 3, 16), np.float32)
    keys[0, 0, :, 0] = [0.0, -1000.0, 1.0]
    values = np.arange(3 * 16, dtype=np.float32).reshape(1, 1, 3, 16)
    got = cpu_kernels.attend(q, keys, values, 3, None, 1.0)
    p = np.exp([-1.0, -1001.0, 0.0]) / np.exp([-1.0, -1001.0, 0.0]).sum()
    assert np.allclose(got[0, 0, 0], p @ values[0, 0], rtol=1e-6) and np.isfinite(got).all()


@needs_kernel
def test_every_stream_gets_its_own_bits_whatever_the_batch_and_threads():
    rng = np.random.default_rng(5)
    q, keys, values, mask = case(rng, 3, 32, 8, 128, 600, 555, True)
    lib = cpu_kernels.library()

    def call(b0, b1, threads):
        qs, ks, vs = (np.ascontiguousarray(a[b0:b1]) for a in (q, keys, values))
        out = np.empty_like(qs)
        scores = np.empty((b1 - b0) * 32 * 555, np.float32)
        flags = mask.astype(np.uint8)
        used = lib.attend(qs.ctypes.data, ks.ctypes.data, vs.ctypes.data, out.ctypes.data, (b1 - b0) * 8, 4, 555,
                          128, 600 * 128, 0.125, flags.ctypes.data, 1, scores.ctypes.data, threads)
        assert used == threads
        return out

    alone = np.concatenate([call(b, b + 1, 1) for b in range(3)])
    for threads in (1, 2, 3):
        assert np.array_equal(call(0, 3, threads), alone)


@needs_kernel
def test_attend_refuses_what_it_cannot_compute():
    rng = np.random.default_rng(0)
    q, keys, values, _ = case(rng, 1, 4, 2, 16, 8, 8, False)
    with pytest.raises(ValueError, match=r"attend needs float32 contiguous q \[B, H, L, D\] and caches"):
        cpu_kernels.attend(q, keys, values, 9, None, 1.0)
    with pytest.raises(ValueError, match="a mask of 1 x 8, got"):
        cpu_kernels.attend(q, keys, values, 8, np.ones(7, bool), 1.0)
    with pytest.raises(ValueError, match=r"a mask of 2 x 8, got .* \(8,\)$"):  # one row per position
        cpu_kernels.attend(np.concatenate([q, q], axis=2), keys, values, 8, np.ones(8, bool), 1.0)
    with pytest.raises(ValueError, match="attend needs float32"):
        cpu_kernels.attend(q.astype(np.float64), keys, values, 8, None, 1.0)
    q8, k8, v8, _ = case(rng, 1, 4, 2, 8, 8, 8, False)
    with pytest.raises(ValueError, match=r"^attend takes head sizes of a multiple of 16 .*"
                                         r" \(4 / 2 heads of 8\)$"):
        cpu_kernels.attend(q8, k8, v8, 8, None, 1.0)
    assert not cpu_kernels.attend_fits(4, 2, 8) and not cpu_kernels.attend_fits(130, 2, 16)
    assert cpu_kernels.attend_fits(32, 8, 128)
    assert cpu_kernels.attends(130, 2, 16) and not cpu_kernels.attends(4, 2, 8) and not cpu_kernels.attends(6, 4, 16)


def many_case(rng, B, H, Hk, L, D, stored, kind):
    """L queries [B, H, L, D] at the last L of `stored` positions, keys and values, and a mask of
    the kind a chunk's attention has."""
    q = rng.normal(size=(B, H, L, D)).astype(np.float32) * 2
    keys, values = (rng.normal(size=(B, Hk, stored, D)).astype(np.float32) for _ in range(2))
    positions, queries = np.arange(stored)[None], np.arange(stored - L, stored)[:, None]
    mask = {"causal": positions <= queries, "window": (positions <= queries) & (positions > queries - 50),
            "random": rng.random((L, stored)) > 0.5, "none": None}[kind]
    if kind == "random":
        mask[np.arange(L), rng.integers(stored, size=L)] = True
    return q, keys, values, mask


@needs_kernel
@pytest.mark.parametrize("B,H,Hk,L,D,stored", [(1, 4, 4, 70, 64, 70), (2, 32, 8, 39, 128, 39),
                                               (1, 6, 2, 45, 48, 157), (3, 2, 1, 100, 16, 333)])
@pytest.mark.parametrize("kind", ["causal", "window", "random", "none"])
def test_many_positions_are_the_exact_softmax_within_float32(B, H, Hk, L, D, stored, kind):
    # More than 64 queries per key head: attend_many, in blocks of 8 over the keys they see.
    rng = np.random.default_rng(L + D + stored)
    q, keys, values, mask = many_case(rng, B, H, Hk, L, D, stored, kind)
    assert not cpu_kernels.attend_fits(H, Hk, D, L) and cpu_kernels.attends(H, Hk, D)
    got = cpu_kernels.attend(q, keys, values, stored, mask, 0.3)
    assert got.shape == q.shape and got.dtype == np.float32
    for position in range(L):
        want, top = reference(q[:, :, position : position + 1], keys, values, stored,
                              None if mask is None else mask[position], 0.3)
        assert np.abs(got[:, :, position : position + 1] - want).max() < 2e-7 * (1 + top)


@needs_kernel
def test_a_position_that_sees_no_key_gets_nan_as_in_numpy_and_its_block_its_own():
    rng = np.random.default_rng(4)
    q, keys, values, mask = many_case(rng, 1, 2, 2, 80, 32, 120, "causal")
    mask[3] = False  # one query of the first block
    mask[64:72] = False  # a whole block
    got = cpu_kernels.attend(q, keys, values, 120, mask, 0.3)
    blind = np.zeros(80, bool)
    blind[3], blind[64:72] = True, True
    with np.errstate(invalid="ignore"):
        numpy = host._attention(q, keys, values, mask, 0.3)
    assert np.isnan(got[:, :, blind]).all() and np.isnan(numpy[:, :, blind]).all()
    for position in np.flatnonzero(~blind):
        want, top = reference(q[:, :, position : position + 1], keys, values, 120, mask[position], 0.3)
        assert np.abs(got[:, :, position : position + 1] - want).max() < 2e-7 * (1 + top)


@needs_kernel
def test_a_position_gets_the_same_bits_whatever_block_and_batch_it_is_in():
    rng = np.random.default_rng(9)
    q, keys, values, mask = many_case(rng, 3, 2, 2, 90, 64, 400, "window")
    whole = cpu_kernels.attend(q, keys, values, 400, mask, 0.125)
    for skip in (1, 3, 8, 13):  # the blocks of 8 queries start elsewhere, and see other keys
        part = cpu_kernels.attend(np.ascontiguousarray(q[:, :, skip:]), keys, values, 400, mask[skip:], 0.125)
        assert np.array_equal(part, whole[:, :, skip:])
    lib = cpu_kernels.library()
    flags = mask.astype(np.uint8)
    for threads in (1, 2, 3):
        for b in range(3):
            qs, ks, vs = (np.ascontiguousarray(a[b : b + 1]) for a in (q, keys, values))
            out = np.empty_like(qs)
            used = lib.attend_many(qs.ctypes.data, ks.ctypes.data, vs.ctypes.data, out.ctypes.data, 2, 90, 400, 64,
                                   400 * 64, 0.125, flags.ctypes.data, 90, threads)
            assert used == threads and np.array_equal(out, whole[b : b + 1])


@needs_kernel
def test_a_ring_left_strided_by_a_full_write_is_read_right():
    rng = np.random.default_rng(3)
    cache = RingKVCache(window=4)
    k, v = (mx.array(rng.normal(size=(1, 3, 2, 16)).astype(np.float32)).transpose(0, 2, 1, 3) for _ in range(2))
    cache.update_and_fetch(k, v)  # 3 positions into a ring of 4 ...
    k6, v6 = (mx.array(rng.normal(size=(1, 6, 2, 16)).astype(np.float32)).transpose(0, 2, 1, 3) for _ in range(2))
    cache.update_and_fetch(k6, v6)  # ... then 6: the write covers the whole ring
    q = mx.array(rng.normal(size=(1, 4, 1, 16)).astype(np.float32))
    k1, v1 = (mx.array(rng.normal(size=(1, 2, 1, 16)).astype(np.float32)) for _ in range(2))
    keys, values = cache.update_and_fetch(k1, v1)
    expected = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.25)
    got = encoder.kernel_attention(q, cache, None, 0.25)
    assert np.asarray(cache.keys).flags.c_contiguous
    assert mx.abs(got - expected).max().item() < 1e-6


# The model's decoder steps


@pytest.fixture(scope="module")
def wide_heads_dir(ckpt_root):
    """Decoder heads of 64 values: the kernel's four-register path for the values."""
    return checkpoint(ckpt_root, head_dim=64, dec_window=20, seed=2)


@needs_kernel
@pytest.mark.parametrize("fixture", ["tiny_dir", "wide_heads_dir"])
def test_steps_take_the_kernel_and_keep_mlx_logits(fixture, request, monkeypatch):
    monkeypatch.setattr(encoder, "ATTEND_MIN", 0)  # the tiny model's attention is below the threshold
    model = load_mlx(request.getfixturevalue(fixture))  # MLX's graphs, whose attention this is
    calls = []
    real = cpu_kernels.attend
    monkeypatch.setattr(cpu_kernels, "attend", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    audio = speech("jfk")[:40000]
    tokens = model.transcribe(audio).tokens
    got = forced_logits(model, audio, tokens)
    steps = [shape for shape in calls if shape[2] == 1]  # chunks and prompts take it too, in blocks
    assert steps and len(steps) < len(calls)
    monkeypatch.setattr(encoder, "through_kernel", lambda *a: False)
    calls.clear()
    want = forced_logits(model, audio, tokens)
    assert calls and all(shape[2] > 1 for shape in calls) and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@needs_kernel
def test_masked_steps_of_speculative_streams_keep_their_tokens(wide_heads_dir, monkeypatch):
    monkeypatch.setattr(encoder, "ATTEND_MIN", 0)
    model = load_model(wide_heads_dir)
    masks = []
    real = cpu_kernels.attend
    monkeypatch.setattr(cpu_kernels, "attend", lambda *a: (masks.append(a[4] is not None), real(*a))[1])
    audio = speech("night1968_5s")
    with_kernel = model.transcribe(audio, speculate=4).tokens
    assert any(masks)  # rings with spare slots past their window: single steps read a mask
    monkeypatch.setattr(encoder, "through_kernel", lambda *a: False)
    assert model.transcribe(audio, speculate=4).tokens == with_kernel == model.transcribe(audio, speculate=0).tokens


@needs_kernel
def test_small_attention_stays_with_mlx(tiny_dir, monkeypatch):
    calls = []  # the steps' calls: positions cached
    real = cpu_kernels.attend
    monkeypatch.setattr(cpu_kernels, "attend", lambda *a: (a[0].shape[2] == 1 and calls.append(a[3]), real(*a))[1])
    model = load_mlx(tiny_dir)  # 4 heads of 16: 128 multiply-adds per cached position
    model.transcribe(speech("jfk")[:40000])
    assert calls == []
    monkeypatch.setattr(encoder, "ATTEND_MIN", 128 * 40)
    model.transcribe(speech("jfk")[:40000])
    assert calls and min(calls) == 40
