"""Decoder passes and encoder chunks on the CPU in numpy around the kernels (host.py) against MLX's graphs."""

import os

import mlx.core as mx
import numpy as np
import pytest

from conftest import checkpoint, load_mlx, speech
from test_streaming import without_left_pad_state

import voxtral_mlx
from voxtral_mlx import cpu_kernels, cpu_quant, host, mkl_bf16
from voxtral_mlx.cache import RingKVCache
from voxtral_mlx.convert import convert

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None,
                                reason=f"the CPU kernels are not available: {cpu_kernels.reason}")


@pytest.fixture(scope="module")
def models(ckpt_root, tmp_path_factory):
    """Quantized and bfloat16 (MKL) models with small windows and a ring of 20 positions, and
    the float32 original."""
    source = checkpoint(ckpt_root, enc_window=24, dec_window=20)
    root = tmp_path_factory.mktemp("host")
    out = {"float32": load_mlx(source)}
    if mkl_bf16.float32_available():
        out["float32-bf16"] = voxtral_mlx.load(source)  # bfloat16 weights, float32 products
    for bits, group in ((4, 32), (4, 64), (8, 64), (6, 64)):
        out[f"q{bits}-{group}"] = voxtral_mlx.load(convert(source, root / f"q{bits}-{group}", q_bits=bits,
                                                           q_group_size=group).path)
    if mkl_bf16.available():
        out["bfloat16"] = voxtral_mlx.load(source, dtype="bfloat16")
    return out


ADOPTED = ["q4-32", "q4-64", "q8-64",
           pytest.param("bfloat16", marks=pytest.mark.skipif(not mkl_bf16.available(), reason="MKL is not loaded")),
           pytest.param("float32-bf16", marks=pytest.mark.skipif(not mkl_bf16.float32_available(),
                                                                 reason="needs MKL and AMX"))]


def steps(model, inputs, tokens, spare, on_host, monkeypatch):
    """Logits [steps, B, vocab] of a prompt of 5 positions, then one position per step."""
    net = model.net
    with monkeypatch.context() as m:
        if not on_host:
            m.setattr(host, "fits", lambda *a: False)
        caches = net.make_cache(inputs.shape[0], spare=spare)
        scales = net.ffn_scales(6)
        out = [net.decode(mx.array(inputs[:, :5]), mx.array(tokens[:, :5]), caches, scales)]
        for p in range(5, inputs.shape[1]):
            out.append(net.decode(mx.array(inputs[:, p : p + 1]), mx.array(tokens[:, p : p + 1]), caches, scales))
        return np.stack([np.array(o) for o in out])


def random_inputs(model, streams: int, positions: int, seed: int):
    rng = np.random.default_rng(seed)
    args = model.net.args.decoder
    inputs = rng.normal(size=(streams, positions, args.dim)).astype(np.float32)
    return inputs, rng.integers(0, args.vocab_size, size=(streams, positions))


# With AMX or VNNI the quantized products sum each group as s (x . q) + b sum(x), as MLX's Metal
# kernels do: where the two terms nearly cancel, the float32 rounding of each (2^-24 of their
# size) is what is left; and x goes in keeping 21 bits below its group's largest value, so a
# last-bit difference between the two paths' norms can move a product by 2^-21 of that value
# times the weights: the logits differ by up to ~6e-5 of the largest.
QUANTIZED = 1e-4 if cpu_kernels.packed_kernel() else 1e-5


def close(got, want, name, exact=None, tolerance=QUANTIZED):
    """Within float32 rounding of MLX's graphs; in bfloat16, where each product rounds its input
    to bfloat16 (which a last-bit difference can move a step), as close to the float32 model's
    numbers `exact` as MLX's."""
    scale = np.abs(want).max()
    if name != "bfloat16":
        assert np.abs(got - want).max() <= tolerance * scale
        return
    assert np.abs(got - want).max() <= 1e-2 * scale

    def rms(error):
        return np.sqrt(np.mean(error**2) / np.mean(exact**2))

    assert rms(got - exact) < 1.1 * rms(want - exact) + 1e-6 < 3e-2


@pytest.mark.parametrize("name", ADOPTED)
@pytest.mark.parametrize("spare", [0, 3])
def test_decoder_passes_on_the_host_give_the_logits_of_mlx_graphs(models, name, spare, monkeypatch):
    # 40 positions: the ring of 20 wraps; with spare slots, steps read it through a mask.
    model = models[name]
    inputs, tokens = random_inputs(model, 2, 40, seed=spare)
    calls = []
    real = host.decode
    monkeypatch.setattr(host, "decode", lambda *a: (calls.append(a[1].shape), real(*a))[1])
    got = steps(model, inputs, tokens, spare, True, monkeypatch)
    dim = model.net.args.decoder.dim
    assert calls == [(2, 5, dim)] + [(2, 1, dim)] * 35
    want = steps(model, inputs, tokens, spare, False, monkeypatch)
    assert len(calls) == 36  # not through the host
    close(got, want, name, name == "bfloat16" and steps(models["float32"], inputs, tokens, spare, False, monkeypatch))


@pytest.mark.parametrize("name", ADOPTED)
def test_passes_of_every_position_on_the_host_give_mlx_logits(models, name, monkeypatch):
    # Speculative passes: several positions over a ring with spare slots, logits of each.
    model = models[name]
    inputs, tokens = random_inputs(model, 1, 30, seed=11)

    def passes(m, on_host):
        with monkeypatch.context() as patch:
            if not on_host:
                patch.setattr(host, "fits", lambda *a: False)
            net = m.net
            caches, scales = net.make_cache(spare=7), net.ffn_scales(6)
            return np.concatenate([np.array(net.decode(mx.array(inputs[:, a:b]), mx.array(tokens[:, a:b]), caches,
                                                       scales, every=True))[0]
                                   for a, b in ((0, 8), (8, 16), (16, 19), (19, 27), (27, 30))])

    close(passes(model, True), passes(model, False), name, name == "bfloat16" and passes(models["float32"], False))


def encoder_frames(model, mel, chunks, on_host, monkeypatch, spare=0):
    """The encoder's frames [B, T / 2, dim] for mel [B, T, n_mels] fed in chunks of these sizes."""
    net = model.net
    with monkeypatch.context() as m:
        if not on_host:
            m.setattr(host, "fits", lambda *a: False)
        caches = net.make_cache(mel.shape[0], encoder_spare=spare)
        out, start = [], 0
        for size in chunks:
            out.append(np.array(net.encoder(mx.array(mel[:, start : start + size]), caches.stem, caches.encoder)))
            start += size
        return np.concatenate(out, axis=1)


CHUNKS = [2, 8, 16, 6, 60, 2, 2, 24]  # mel frames: 1 to 30 encoder frames, past a window of 24


@pytest.mark.parametrize("name", ADOPTED)
@pytest.mark.parametrize("spare", [0, 7])
def test_encoder_chunks_on_the_host_give_the_frames_of_mlx_graphs(models, name, spare, monkeypatch):
    # With 7 spare slots, chunks of up to 8 frames are written first and read in place (here
    # through numpy around the kernels; a layer in one call: below).
    monkeypatch.setattr(host, "_step_layers", lambda *a: None)
    model = models[name]
    mel = np.random.default_rng(5).normal(size=(2, sum(CHUNKS), 128)).astype(np.float32)
    calls = []
    real = host.encode
    monkeypatch.setattr(host, "encode", lambda *a: (calls.append(a[1].shape[1]), real(*a))[1])
    events = []  # in place: a chunk's keys written, then read; else read with the ring, then written
    real_attend, real_write = cpu_kernels.attend, RingKVCache.write_host
    monkeypatch.setattr(cpu_kernels, "attend", lambda q, *a: (events.append(("read", q.shape[2])), real_attend(q, *a))[1])
    monkeypatch.setattr(RingKVCache, "write_host",
                        lambda c, k, v: (events.append(("write", k.shape[2])), real_write(c, k, v))[1])
    got = encoder_frames(model, mel, CHUNKS, True, monkeypatch, spare)
    assert calls == [c // 2 for c in CHUNKS]
    layers = len(model.net.encoder.transformer.layers)
    order = {True: ["write", "read"], False: ["read", "write"]}
    assert events == [(e, c // 2) for c in CHUNKS for _ in range(layers) for e in order[c // 2 <= spare + 1]]
    want = encoder_frames(model, mel, CHUNKS, False, monkeypatch, spare)
    assert len(calls) == len(CHUNKS) and got.shape == want.shape == (2, sum(CHUNKS) // 2, got.shape[2])
    # The products of q_packed_t (groups of 64) keep x to 21 bits below each group's largest
    # value: a last-bit difference in x can move a product 2^-21.
    close(got, want, name,
          name == "bfloat16" and encoder_frames(models["float32"], mel, CHUNKS, False, monkeypatch, spare), 1e-4)


@pytest.mark.parametrize("name", ADOPTED)
def test_a_streams_numbers_do_not_depend_on_the_streams_beside_it(models, name, monkeypatch):
    # (In bfloat16, this model's head, 1314 rows, not a multiple of 32, goes to MKL's GEMM, whose
    # sums depend on the number of rows: `linear` multiplies it a stream at a time. The 4B
    # model's, 131072 rows, takes the row kernel, as every other product here.)
    model = models[name]
    inputs, tokens = random_inputs(model, 3, 30, seed=7)
    mel = np.random.default_rng(6).normal(size=(3, sum(CHUNKS), 128)).astype(np.float32)
    together = steps(model, inputs, tokens, 2, True, monkeypatch)
    frames = encoder_frames(model, mel, CHUNKS, True, monkeypatch)
    for b in range(3):
        assert np.array_equal(together[:, b], steps(model, inputs[b : b + 1], tokens[b : b + 1], 2, True,
                                                    monkeypatch)[:, 0])
        assert np.array_equal(frames[b], encoder_frames(model, mel[b : b + 1], CHUNKS, True, monkeypatch)[0])
    # The conv stem and the adapter (MLX's, 3 x 16 tokens: more rows than the row kernels take).
    net = model.net
    audio = np.array(net.encode(mx.array(mel[:, :128]), net.make_cache(3)))
    for b in range(3):
        assert np.array_equal(audio[b], np.array(net.encode(mx.array(mel[b : b + 1, :128]), net.make_cache(1)))[0])


@pytest.mark.parametrize("name", ADOPTED)
def test_the_left_pads_state_gives_a_session_its_tokens(models, name, monkeypatch):
    # The state of the tokens that hear only the left pad, copied from the model's snapshot
    # into a single stream and a batch: the tokens computed in full, their probabilities to the
    # last bits that another chunking of the audio moves too (more for the packed quantized
    # kernel, whose products keep x to 21 bits below each group's largest value).
    model = models[name]
    clips = [speech("night1968_5s"), speech("jfk")[: 16000 * 3]]
    whole = [without_left_pad_state(model, x, monkeypatch, speculate=0) for x in clips]
    alone = [model.transcribe(x, speculate=0) for x in clips]
    assert model.net.snapshots.nbytes > 0
    for got, want, batch in zip(alone, whole, model.transcribe(clips)):
        assert got.tokens == want.tokens == batch.tokens
        for other in (want, batch):
            np.testing.assert_allclose([r.probability for r in got.token_records],
                                       [r.probability for r in other.token_records],
                                       rtol=QUANTIZED if name.startswith("q") else 1e-5)


@pytest.mark.parametrize("name", ADOPTED)
@pytest.mark.parametrize("rows", [10, 20, 40])
def test_a_batchs_products_are_each_streams_own(models, name, rows, monkeypatch):
    # 3 x 10 rows: one product (the row kernels take 32); 3 x 20 and 3 x 40: one product where
    # the layer gives a row the same bits whatever rows surround it (q_packed_t), else each
    # stream's apart, written into one array (the row kernel, MKL's GEMM).
    if rows == 10 and name == "bfloat16" and cpu_kernels.row_kernel() is None:
        pytest.skip("without a row kernel, MKL multiplies 30 rows")
    layer = models[name].net.encoder.transformer.layers[0].attention.wq
    x = np.random.default_rng(rows).normal(size=(3, rows, models[name].net.args.encoder.dim)).astype(np.float32)
    alone = [layer.host(x[b]) for b in range(3)]
    calls = []
    real = layer.host
    monkeypatch.setattr(layer, "host", lambda a, *out: (calls.append(len(a)), real(a, *out))[1])
    got = host.linear(layer, x)
    assert got.shape == (3, rows, layer.host_features) and got.dtype == np.float32
    assert all(np.array_equal(got[b], alone[b]) for b in range(3))
    stacked = rows == 10 or (name in ("q4-64", "q8-64") and cpu_kernels.packed_kernel() is not None)
    assert calls == ([3 * rows] if stacked else [rows] * 3)


def test_passes_go_to_the_host_where_every_product_is_a_kernel_on_numpy_rows(models):
    for name, model in models.items():
        net = model.net
        caches = net.make_cache()
        adopted = cpu_quant.adopted(net) or mkl_bf16.adopted(net)
        assert adopted == (name in ("q4-32", "q4-64", "q8-64", "bfloat16", "float32-bf16"))
        assert host.fits(net.layers, caches.decoder, [net.embedding_module.tok_embeddings]) == adopted
        assert host.fits(net.encoder.transformer.layers, caches.encoder) == adopted
    net = models["q4-64"].net
    caches = net.make_cache()
    net.decode(mx.zeros((3, net.args.decoder.dim)), mx.array([1, 2, 3]), caches, net.ffn_scales(6))
    assert host.fits(net.layers, caches.decoder)
    caches.decoder[-1].keys = caches.decoder[-1].keys.astype(mx.bfloat16)
    assert not host.fits(net.layers, caches.decoder)


@pytest.mark.parametrize("position", [0, 1, 37, 8191, 10**6])
def test_rope_turns_interleaved_pairs_by_the_positions_angles(position):
    rng = np.random.default_rng(position)
    x = rng.normal(size=(2, 3, 64)).astype(np.float32)
    cos, sin = host.rotation(position, 64, 1e6)
    got = host.rope(x, cos, sin)
    angles = position * 1e6 ** (-np.arange(0, 64, 2) / 64)
    pairs = x.astype(np.float64).reshape(2, 3, 32, 2)
    want = np.stack([pairs[..., 0] * np.cos(angles) - pairs[..., 1] * np.sin(angles),
                     pairs[..., 0] * np.sin(angles) + pairs[..., 1] * np.cos(angles)], axis=-1).reshape(x.shape)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-6 * np.abs(want).max()
    if position < 1000:  # MLX's angles are float32: at 8191, 1e-4 off; the host's are float64
        mlx = np.array(mx.fast.rope(mx.array(x)[:, :, None], 64, traditional=True, base=1e6, scale=1.0,
                                    offset=position))[:, :, 0]
        assert np.abs(got - mlx).max() < 1e-5 * np.abs(want).max()


def test_numpys_blas_runs_on_one_thread_once_the_kernels_multiply(models):
    # Its idle threads would spin between calls and take the second core from the kernels' worker.
    from threadpoolctl import threadpool_info

    assert models["q4-64"] and cpu_quant.adopted(models["q4-64"].net)
    pools = [p for p in threadpool_info() if p["internal_api"] == "openblas"]
    if not pools:
        pytest.skip("numpy does not use OpenBLAS here")
    assert all(p["num_threads"] == 1 for p in pools)


@pytest.mark.parametrize("heads,kv_heads,batch", [(8, 8, 1), (8, 2, 2), (6, 3, 1)])
def test_large_attentions_share_their_key_heads_among_threads_with_the_same_bits(heads, kv_heads, batch,
                                                                                 monkeypatch):
    rng = np.random.default_rng(heads + kv_heads)
    L, S, D = 24, 40, 16
    q = rng.normal(size=(batch, heads, L, D)).astype(np.float32)
    k, v = (rng.normal(size=(batch, kv_heads, S, D)).astype(np.float32) for _ in range(2))
    mask = np.tril(np.ones((L, S), bool), S - L)
    alone = host._attention(q, k, v, mask, 0.25)
    monkeypatch.setattr(cpu_kernels, "threads", lambda: 3)
    monkeypatch.setattr(host, "SPLIT_ATTENTION", 1)
    monkeypatch.setattr(host, "_pool", None)
    calls = []
    real = host._attention
    monkeypatch.setattr(host, "_attention", lambda *a: (calls.append(a[1].shape[1]), real(*a))[1])
    got = host.attention_rows(q, k, v, mask, 0.25)
    assert np.array_equal(got, alone) and sorted(calls) == sorted(np.diff(np.linspace(0, kv_heads, min(3, kv_heads) + 1).astype(int)))
    want = np.einsum("bhls,bhsd->bhld", softmax(q, np.repeat(k, heads // kv_heads, axis=1), mask, 0.25),
                     np.repeat(v, heads // kv_heads, axis=1).astype(np.float64))
    assert np.abs(got - want).max() < 1e-5
    pid = os.fork()  # a forked child has none of the pool's threads: it starts its own
    if pid == 0:
        os._exit(0 if np.array_equal(host.attention_rows(q, k, v, mask, 0.25), alone) else 1)
    assert os.waitpid(pid, 0)[1] == 0


def softmax(q, k, mask, scale):
    scores = np.einsum("bhld,bhsd->bhls", q.astype(np.float64), k.astype(np.float64)) * scale
    scores = np.where(mask, scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return scores / scores.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("B,L,heads,D", [(1, 1, 32, 128), (2, 7, 4, 64), (3, 5, 2, 16), (1, 300, 32, 64)])
def test_the_rope_kernel_turns_each_heads_pairs_and_puts_heads_first(B, L, heads, D):
    rng = np.random.default_rng(L + D)
    x = rng.normal(size=(B, L, heads * D)).astype(np.float32)
    cos, sin = host.rotation(37 + np.arange(L), D, 1e6)
    got = cpu_kernels.rope_heads(x, heads, cos, sin)
    assert got.shape == (B, heads, L, D) and got.dtype == np.float32 and got.flags.c_contiguous
    exact = host.rope(x.reshape(B, L, heads, D).transpose(0, 2, 1, 3).astype(np.float64), cos.astype(np.float64),
                      sin.astype(np.float64))
    assert np.abs(got - exact).max() <= 3e-7 * np.abs(x).max()  # a rounding or two of float32
    numpy = host.rope(x.reshape(B, L, heads, D).transpose(0, 2, 1, 3), cos, sin)
    assert np.abs(got - numpy).max() <= 3e-7 * np.abs(x).max()
    one = np.empty_like(got)  # on one thread: the same bits
    cpu_kernels.library().rope_heads(x.ctypes.data, cos.ctypes.data, sin.ctypes.data, one.ctypes.data, B, L,
                                     heads, D, 1)
    assert np.array_equal(one, got)
    with pytest.raises(ValueError, match=r"D a multiple of 16\) and cos, sin \[L, D / 2\], got \(1, 1, 40\) in 2"):
        cpu_kernels.rope_heads(np.zeros((1, 1, 40), np.float32), 2, *np.zeros((2, 1, 10), np.float32))


@pytest.mark.parametrize("rows,K", [(1, 3072), (3, 1280), (5, 37), (2, 16)])
def test_the_norm_kernel_is_rms_norm_to_float32_rounding_with_each_rows_own_bits(rows, K):
    rng = np.random.default_rng(K)
    x = (rng.normal(size=(rows, K)) * rng.uniform(0.01, 100, size=(rows, 1))).astype(np.float32)
    weight, scale = (rng.normal(size=K).astype(np.float32) for _ in range(2))
    exact = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5) * weight
    for s, want in ((None, exact), (scale, exact * scale)):
        got = cpu_kernels.rms_norm(x, weight, 1e-5, s)
        assert got.shape == x.shape and got.dtype == np.float32
        assert np.all(np.abs(got - want) <= 4e-7 * np.abs(want) + 1e-30)  # three or four roundings
        assert all(np.array_equal(got[r], cpu_kernels.rms_norm(x[r : r + 1], weight, 1e-5, s)[0]) for r in range(rows))
    with pytest.raises(ValueError, match=rf"a weight \(and scale\) of {K} values, got {K} and {K + 1}"):
        cpu_kernels.rms_norm(x, weight, 1e-5, np.zeros(K + 1, np.float32))


# Models whose every decoder product goes through a row kernel: packed quantized layers (groups
# of 64), bfloat16 weights (multiples of 32) with float32 or bfloat16 products.
STEPPED = [pytest.param(name, marks=pytest.mark.skipif(cpu_kernels.packed_kernel() is None,
                                                       reason=f"no packed quantized kernel: {cpu_kernels.packed_reason}"))
           for name in ("q4-64", "q8-64")] + [
    pytest.param("bfloat16", marks=pytest.mark.skipif(not mkl_bf16.available() or cpu_kernels.row_kernel() is None,
                                                      reason="needs MKL and a row kernel")),
    pytest.param("float32-bf16", marks=pytest.mark.skipif(not mkl_bf16.float32_available(),
                                                          reason="needs MKL and a row kernel"))]


@pytest.mark.parametrize("name", STEPPED)
@pytest.mark.parametrize("streams,spare", [(1, 0), (3, 3)])
def test_a_step_goes_through_each_layer_in_one_call_with_the_bits_of_the_numpy_path(models, name, streams, spare,
                                                                                     monkeypatch):
    # 40 positions over rings of 20 (spare slots: through a mask once they wrap).
    model = models[name]
    net = model.net
    inputs, tokens = random_inputs(model, streams, 40, seed=streams)
    calls = []
    real = cpu_kernels.layer_step
    monkeypatch.setattr(cpu_kernels, "layer_step", lambda *a: (calls.append((a[1].shape, a[8], a[9])), real(*a))[1])
    got = steps(model, inputs, tokens, spare, True, monkeypatch)
    capacity = net.make_cache(1, spare=spare).decoder[0].capacity
    assert calls == [((streams, 1, net.args.decoder.dim), p % capacity, min(p + 1, capacity))
                     for p in range(5, 40) for _ in net.layers]
    with monkeypatch.context() as m:
        m.setattr(host, "_step_layers", lambda *a: None)
        assert np.array_equal(got, steps(model, inputs, tokens, spare, True, monkeypatch))
    assert len(calls) == 35 * len(net.layers)


@pytest.mark.parametrize("name", ["float32", "q4-32", *STEPPED])
def test_rows_of_streams_at_positions_of_their_own_have_the_numbers_of_their_own_steps(models, name, monkeypatch):
    # Three streams at positions 7, 30 and 25 (rings of 20: two have wrapped; the last has spare
    # slots, as sessions do, and reads its ring through a mask), at delays of their own.
    model = models[name]
    net = model.net
    lengths, delays = [7, 30, 25], [6, 3, 6]
    inputs, tokens = random_inputs(model, 3, 31, seed=11)

    def primed(i, spare):
        caches, scales = net.make_cache(1, spare=spare), net.ffn_scales(delays[i])
        net.decode(mx.array(inputs[i : i + 1, : lengths[i]]), mx.array(tokens[i : i + 1, : lengths[i]]), caches,
                   scales)
        return caches, scales

    alone = []
    for i in range(3):
        caches, scales = primed(i, 3 * (i == 2))
        p = lengths[i]
        alone.append(np.array(net.decode(mx.array(inputs[i : i + 1, p : p + 1]),
                                         mx.array(tokens[i : i + 1, p : p + 1]), caches, scales))[0])
    primes = [primed(i, 3 * (i == 2)) for i in range(3)]
    audio = np.stack([inputs[i, lengths[i]] for i in range(3)])
    ids = np.array([tokens[i, lengths[i]] for i in range(3)])
    calls = []
    real = host.decode_rows
    monkeypatch.setattr(host, "decode_rows", lambda *a: (calls.append(len(a[3])), real(*a))[1])
    got = np.array(net.decode_rows(mx.array(audio), mx.array(ids), [c for c, _ in primes], [s for _, s in primes]))
    assert got.shape == (3, net.args.decoder.vocab_size)
    assert [c.decoder[0].offset for c, _ in primes] == [n + 1 for n in lengths]
    if name == "float32":  # MLX's graphs: its products of three rows sum in another order than one row's
        assert calls == []
        np.testing.assert_allclose(got, np.stack(alone), rtol=0, atol=1e-5 * np.abs(got).max())
    else:
        assert calls == [3] and all(np.array_equal(got[i], alone[i]) for i in range(3))


@pytest.mark.parametrize("name", STEPPED[:1])
def test_a_layers_call_is_made_again_when_its_weights_change(models, name, monkeypatch):
    net = models[name].net
    inputs, tokens = random_inputs(models[name], 1, 8, seed=5)
    before = host._step_layers(net, net.layers)
    assert host._step_layers(net, net.layers) is before and len(before) == len(net.layers)
    norm = net.layers[1].ffn_norm
    weight = norm.weight
    try:
        norm.weight = weight * 2
        mx.eval(norm.weight)
        after = host._step_layers(net, net.layers)
        assert after is not before and after[0].ffn_norm == before[0].ffn_norm
        assert after[1].ffn_norm == np.asarray(norm.weight).ctypes.data != before[1].ffn_norm
        got = steps(models[name], inputs, tokens, 0, True, monkeypatch)
        monkeypatch.setattr(host, "_step_layers", lambda *a: None)
        assert np.array_equal(got, steps(models[name], inputs, tokens, 0, True, monkeypatch))
    finally:
        norm.weight = weight
    monkeypatch.undo()
    assert host._step_layers(net, net.layers) is not None
    norm.weight = weight.astype(mx.bfloat16)  # not float32: the numpy path
    try:
        assert host._step_layers(net, net.layers) is None
    finally:
        norm.weight = weight


@pytest.mark.parametrize("name", STEPPED[:1])
def test_the_layer_call_refuses_what_it_does_not_take(models, name):
    net = models[name].net
    layer = host._step_layers(net, net.layers)[0]
    a = net.layers[0].attention
    dim, D = net.args.decoder.dim, a.head_dim
    x, scale = np.zeros((1, 1, dim), np.float32), np.ones(dim, np.float32)
    cos, sin = host.rotation(np.arange(1), D, a.rope_theta)
    ring = np.zeros((1, a.n_kv_heads, 4, D), np.float32)
    with pytest.raises(ValueError, match=r"layer_step needs float32 contiguous x \[B, L, dim\] of at most 32 rows "):
        cpu_kernels.layer_step(layer, np.zeros((1, 33, dim), np.float32), scale, *host.rotation(np.arange(33), D, 1e4),
                               ring, ring.copy(), 4, 0, 4, None, 1.0)
    with pytest.raises(ValueError, match=r"and a mask of L x `stored` values"):
        cpu_kernels.layer_step(layer, x, scale, cos, sin, ring, ring.copy(), 4, 0, 2, np.ones(3, bool), 1.0)
    with pytest.raises(ValueError, match=r"1 positions from slot 4 of a ring of 4 \(4 allocated, 1 stored\)"):
        cpu_kernels.layer_step(layer, x, scale, cos, sin, ring, ring.copy(), 4, 4, 1, None, 1.0)
    with pytest.raises(ValueError, match=r"3 positions from slot 2 of a ring of 8 \(4 allocated, 4 stored\)"):
        cpu_kernels.layer_step(layer, np.zeros((1, 3, dim), np.float32), scale, *host.rotation(np.arange(3), D, 1e4),
                               ring, ring.copy(), 8, 2, 4, None, 1.0)
    cpu_kernels.layer_step(layer, x, scale, cos, sin, ring, values := ring.copy(), 4, 3, 4, None, 1.0)
    assert np.all(np.isfinite(x)) and not np.any(ring[:, :, :3]) and not np.any(values[:, :, :3])
    with pytest.raises(ValueError, match=r"contiguous bfloat16 bits of multiples of 32 in 1 or 3 parts, got uint16 "
                                         r"\(48, 64\) in 3"):
        cpu_kernels.StepWeight.of(np.zeros((48, 64), np.uint16), 3)
    with pytest.raises(ValueError, match=r"got float32 \(64, 64\) in 1"):
        cpu_kernels.StepWeight.of(np.zeros((64, 64), np.float32), 1)
    with pytest.raises(ValueError, match=r"a packed weight takes x in 3 or 4 parts, not 1"):
        cpu_kernels.StepWeight.of(net.layers[0].attention.wq._q, 1)
    with pytest.raises(ValueError, match=r"one value per row of its weight, got float32 \(3,\)"):
        cpu_kernels.StepWeight.of(net.layers[0].attention.wq._q, 4, np.zeros(3, np.float32))


@pytest.mark.parametrize("name", STEPPED)
@pytest.mark.parametrize("streams", [1, 2])
def test_encoder_chunks_read_in_place_go_through_each_layer_in_one_call_with_the_bits_of_the_numpy_path(
        models, name, streams, monkeypatch):
    # 7 spare slots: chunks of up to 8 frames in place, past the window of 24 (the ring wraps);
    # those of 12 and 30 frames are not.
    model = models[name]
    mel = np.random.default_rng(streams).normal(size=(streams, sum(CHUNKS), 128)).astype(np.float32)
    calls = []
    real = cpu_kernels.layer_step
    monkeypatch.setattr(cpu_kernels, "layer_step", lambda *a: (calls.append((a[1].shape[:2], a[8], a[9])), real(*a))[1])
    got = encoder_frames(model, mel, CHUNKS, True, monkeypatch, spare=7)
    capacity = model.net.make_cache(1, encoder_spare=7).encoder[0].capacity
    want, offset = [], 0
    for frames in (c // 2 for c in CHUNKS):
        if frames <= 8 and streams * frames <= 32:
            want += [((streams, frames), offset % capacity, min(offset + frames, capacity))] * len(
                model.net.encoder.transformer.layers)
        offset += frames
    assert calls == want and len({c[0] for c in calls}) == 4  # chunks of 1, 3, 4 and 8 frames
    with monkeypatch.context() as m:
        m.setattr(host, "_step_layers", lambda *a: None)
        assert np.array_equal(got, encoder_frames(model, mel, CHUNKS, True, monkeypatch, spare=7))
    assert len(calls) == len(want)


@pytest.mark.parametrize("name", STEPPED)
def test_speculative_passes_go_through_each_layer_in_one_call_with_the_bits_of_the_numpy_path(models, name,
                                                                                              monkeypatch):
    model = models[name]
    net = model.net
    inputs, tokens = random_inputs(model, 1, 30, seed=13)
    calls = []
    real = cpu_kernels.layer_step
    monkeypatch.setattr(cpu_kernels, "layer_step", lambda *a: (calls.append(a[1].shape[1]), real(*a))[1])

    def passes():
        caches, scales = net.make_cache(spare=7), net.ffn_scales(6)
        return np.concatenate([np.array(net.decode(mx.array(inputs[:, a:b]), mx.array(tokens[:, a:b]), caches,
                                                   scales, every=True))[0]
                               for a, b in ((0, 8), (8, 16), (16, 19), (19, 27), (27, 28), (28, 30))])

    got = passes()
    assert calls == [n for n in (8, 8, 3, 8, 1, 2) for _ in net.layers]
    monkeypatch.setattr(host, "_step_layers", lambda *a: None)
    assert np.array_equal(got, passes()) and len(calls) == 6 * len(net.layers)
