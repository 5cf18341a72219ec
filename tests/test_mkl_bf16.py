"""bfloat16 products through MKL on the CPU: the same network, up to bfloat16 rounding."""

from pathlib import Path
from unittest import mock

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import forced_logits, load_mlx, load_model, reference, speech

import voxtral_mlx
from voxtral_mlx import mkl_bf16
from voxtral_mlx.config import AudioArgs

pytestmark = pytest.mark.skipif(not mkl_bf16.available(),
                                reason="MKL is not loaded: pip install '.[mkl]' (x86-64 Linux)")


def bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even), as float64."""
    return np.array(mx.array(x, mx.float32).astype(mx.bfloat16).astype(mx.float32), np.float64)


@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (3, 5, 7), (7, 1000, 3072), (40, 64, 640)])
def test_products_are_float32_sums_of_bfloat16_terms(M, N, K):
    rng = np.random.default_rng(K)
    x, w = rng.normal(size=(M, K)), rng.normal(size=(N, K))
    wb = mx.array(w, mx.float32).astype(mx.bfloat16)
    got = np.array(mkl_bf16.matmul_t(mx.array(x, mx.float32)[None], mkl_bf16.bits(wb)))
    assert got.shape == (1, M, N) and got.dtype == np.float32
    exact = bf16(x) @ bf16(w).T
    # float32 accumulation: an error of a few float32 ulps of the sum of the terms' magnitudes.
    bound = 1e-6 * np.sqrt(K) * (np.abs(bf16(x)) @ np.abs(bf16(w)).T) + 1e-30
    assert np.all(np.abs(got[0] - exact) <= 8 * bound)


@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (3, 5, 7), (40, 64, 640)])
def test_numpy_rows_get_the_bits_of_mlx_rows(M, N, K):
    # host's products: the row kernel where it fits (the first), else MKL.
    rng = np.random.default_rng(M)
    x, w = rng.normal(size=(M, K)).astype(np.float32), mkl_bf16.bits(mx.array(rng.normal(size=(N, K)), mx.bfloat16))
    got = mkl_bf16.rows_t(x, w)
    assert got.dtype == np.float32 and np.array_equal(got, np.array(mkl_bf16.matmul_t(mx.array(x), w)))


def test_bfloat16_on_the_cpu_keeps_product_weights_bfloat16_and_the_rest_float32(small_windows_dir):
    model = voxtral_mlx.load(small_windows_dir, dtype="bfloat16")
    modules = dict(model.net.named_modules())
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in modules.values())
    linears = [m for m in modules.values() if isinstance(m, mkl_bf16.Linear)]
    # 7 per encoder and decoder layer, 2 in the adapter, 2 per delay-conditioning MLP.
    args = model.net.args
    assert len(linears) == 7 * (args.encoder.n_layers + args.decoder.n_layers) + 2 + 2 * args.decoder.n_layers
    assert isinstance(model.net.embedding_module.tok_embeddings, mkl_bf16.Embedding)
    products = {n for n, m in modules.items() if isinstance(m, (mkl_bf16.Linear, mkl_bf16.Embedding))}
    for name, p in tree_flatten(model.net.parameters()):
        product = name.endswith(".weight") and name.rsplit(".", 1)[0] in products
        assert p.dtype == (mx.bfloat16 if product else mx.float32), name
    assert model.dtype == mx.float32  # what the activations are


def embeddings_and_tokens(path, audio, delay_ms=480):
    ref = reference(path)
    tokens, margins = ref.transcribe(audio, delay_ms)
    embeds = ref.audio_embeddings(audio, delay_ms)
    inputs = ref.prompt(delay_ms) + tokens[:-1]  # teacher forcing: what greedy decoding fed back
    return ref, embeds, inputs


def decoder_logits(model, embeds, inputs, delay_ms=480) -> np.ndarray:
    net = model.net
    caches = net.make_cache()
    n = len(inputs)
    x = mx.array(embeds[:n], mx.float32)
    logits = net.decode(x, mx.array(inputs), caches, net.ffn_scales(delay_ms // 80), every=True)
    return np.array(logits.astype(mx.float32), np.float64)


def test_decoder_logits_match_the_reference_to_bfloat16_rounding(small_windows_dir):
    ref, embeds, inputs = embeddings_and_tokens(small_windows_dir, speech("night1968_5s"))
    expected = ref.decoder_logits(embeds, inputs, 480)
    scale = np.abs(expected).max()
    fp32 = decoder_logits(load_model(small_windows_dir), embeds, inputs)
    mkl = decoder_logits(voxtral_mlx.load(small_windows_dir, dtype="bfloat16"), embeds, inputs)
    assert np.abs(fp32 - expected).max() < 1e-5 * scale
    error = np.abs(mkl - expected).max()
    assert 1e-5 * scale < error < 2e-2 * scale  # bfloat16 inputs to every product, and no worse
    # Where the reference is not near a tie, the same token wins.
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 4 * error
    assert clear.sum() > 0.8 * len(clear)
    assert np.array_equal(mkl[clear].argmax(-1), expected[clear].argmax(-1))


def audio_embeddings(model, audio) -> np.ndarray:
    """The adapter's output for every token of an offline run (those that hear only the left
    pad computed too, not copied from the model's snapshot of their state)."""
    captured, real = [], model.net.encode
    model.net.encode = lambda mel, caches: (captured.append(real(mel, caches)), captured[-1])[1]
    try:
        with mock.patch.object(AudioArgs, "pad_only_tokens", property(lambda self: 0)):
            session = model.stream(delay_ms=480)
            session.feed(audio)
            session.finish()
    finally:
        del model.net.encode
    return np.concatenate([np.array(e[0], np.float64) for e in captured])


def relative_rms(error, scale) -> float:
    return float(np.sqrt(np.mean(error**2) / np.mean(scale**2)))


def test_audio_embeddings_are_float32_ones_with_bfloat16_product_inputs(small_windows_dir, monkeypatch):
    ref = reference(small_windows_dir)
    audio = speech("night1968_5s")
    expected = ref.audio_embeddings(audio, 480)
    got = audio_embeddings(voxtral_mlx.load(small_windows_dir, dtype="bfloat16"), audio)
    assert got.shape == expected.shape
    # Each product of the encoder and adapter rounds its input to bfloat16 (8 significant
    # bits): on this model, about 1% relative error at the end.
    assert relative_rms(got - expected, expected) < 2e-2
    # The same network in MLX float32 with each linear layer's input rounded to bfloat16 gives
    # that same error: what remains between the two is float32 accumulation order.
    linear = nn.Linear.__call__
    monkeypatch.setattr(nn.Linear, "__call__", lambda self, x: linear(self, x.astype(mx.bfloat16).astype(mx.float32)))
    emulated = audio_embeddings(load_mlx(small_windows_dir), audio)
    assert relative_rms(emulated - expected, expected) > 5e-3
    assert relative_rms(got - emulated, expected) < 0.2 * relative_rms(got - expected, expected)


def test_transcription_streams_as_it_runs_offline(small_windows_dir):
    model = voxtral_mlx.load(small_windows_dir, dtype="bfloat16")
    audio = speech("jfk")
    offline = model.transcribe(audio)
    assert len(offline.tokens) == -(-audio.size // 1280) + 11 and offline.text
    session = model.stream()
    for i in range(0, audio.size, 3000):
        session.feed(audio[i : i + 3000])
    session.finish()
    assert session.tokens == offline.tokens
    assert model.transcribe(audio, speculate=8).tokens == offline.tokens


# float32 products over bfloat16 weights: the CPU default where MKL and a row kernel are.

needs_row_kernel = pytest.mark.skipif(not mkl_bf16.float32_available(), reason="needs MKL and a row kernel")


def widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.skipif(not voxtral_mlx.cpu_kernels.amx(), reason="needs the AMX kernels")
def test_three_bfloat16_parts_add_up_to_x_exactly():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 100)) * np.exp(rng.normal(size=(3, 100)) * 8)).astype(np.float32)
    x[0, :8] = [1 + 2**-23, -(1 + 2**-8 + 2**-16 + 2**-23), 0.0, -0.0, 2.0**-120, 3e38, -1e-30, 1 - 2**-24]
    parts = voxtral_mlx.cpu_kernels.bf16_split(x, 3)
    assert parts.shape == (3, 3, 100) and parts.dtype == np.uint16
    assert np.array_equal(widen(parts[0]) + widen(parts[1]) + widen(parts[2]), x.astype(np.float64))
    # Each part is the nearest bfloat16 to what the ones before it left; one part is bf16(x).
    assert np.array_equal(widen(parts[0]), bf16(x))
    assert np.array_equal(voxtral_mlx.cpu_kernels.bf16_split(x, 1)[0], parts[0])
    with pytest.raises(ValueError, match="1 or 3 parts, not 2"):
        voxtral_mlx.cpu_kernels.bf16_split(x, 2)


@needs_row_kernel
@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (5, 64, 3072), (6, 32, 96), (17, 320, 96), (32, 128, 1056),
                                   (33, 64, 640), (40, 1000, 96), (129, 64, 96)])
def test_three_parts_give_float32_products(M, N, K):
    # Up to 32 rows through the row kernel (AMX: 5 rows of 3 parts per tile), more through MKL
    # (AMX: the parts as one matrix up to 128 rows, then one product each; else the widened
    # weights).
    rng = np.random.default_rng(M + N + K)
    x = rng.normal(size=(M, K)).astype(np.float32)
    w = mkl_bf16.bits(mx.array(rng.normal(size=(N, K)), mx.bfloat16))
    got = mkl_bf16.rows_t(x, w, 3)
    assert got.dtype == np.float32 and np.array_equal(got, np.array(mkl_bf16.matmul_t(mx.array(x), w, 3)))
    exact = x.astype(np.float64) @ widen(w).T
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(widen(w)).T
    # float32 accumulation of exact terms: as close as a float32 GEMM of the widened weights...
    assert np.all(np.abs(got - exact) <= 8e-6 * np.sqrt(K) * magnitude + 1e-30)
    sgemm = x @ widen(w).astype(np.float32).T
    assert np.abs(got - exact).max() <= 4 * np.abs(sgemm - exact).max() + 1e-30
    # ...and far closer than bfloat16 inputs.
    assert np.abs(got - exact).max() < 0.05 * np.abs(bf16(x) @ widen(w).T - exact).max()


@needs_row_kernel
def test_float32_on_the_cpu_keeps_a_bfloat16_checkpoints_product_weights(small_windows_dir, tmp_path):
    model = load_model(small_windows_dir)  # float32, the CPU default
    kernel = voxtral_mlx.cpu_kernels.row_kernel()
    assert mkl_bf16.describe(model.net) == ("float32 products over bfloat16 weights through MKL and the "
                                            f"{kernel} row kernel")
    layers = [m for _, m in model.net.named_modules() if isinstance(m, (mkl_bf16.Linear, mkl_bf16.Embedding))]
    assert layers and all(m._parts == 3 and m.weight.dtype == mx.bfloat16 for m in layers)
    assert model.dtype == mx.float32
    # A float32 checkpoint stays on MLX's float32 graphs: its weights are not bfloat16's.
    from voxtral_mlx.convert import convert

    f32 = voxtral_mlx.load(convert(small_windows_dir, tmp_path / "f32", dtype="float32").path)
    assert not mkl_bf16.adopted(f32.net) and {p.dtype for _, p in tree_flatten(f32.net.parameters())} == {mx.float32}


@needs_row_kernel
def test_float32_products_over_bfloat16_weights_give_the_float32_models_numbers(small_windows_dir):
    ref = reference(small_windows_dir)
    audio = speech("night1968_5s")
    expected = ref.audio_embeddings(audio, 480)
    over_bf16, mlx_graphs = load_model(small_windows_dir), load_mlx(small_windows_dir)
    got, mlx_got = audio_embeddings(over_bf16, audio), audio_embeddings(mlx_graphs, audio)
    # float32 throughout (bfloat16 inputs to the products: 1%, test above).
    assert relative_rms(got - expected, expected) < 1e-5
    assert relative_rms(got - expected, expected) < 3 * relative_rms(mlx_got - expected, expected) + 1e-7
    x = speech("jfk")
    assert over_bf16.transcribe(x).tokens == mlx_graphs.transcribe(x).tokens


@pytest.mark.parametrize("parts", [1, pytest.param(3, marks=needs_row_kernel)])
@pytest.mark.parametrize("M", [1, 32, 40, 129])
def test_products_written_into_a_given_array_are_those_returned(parts, M):
    # The row kernel (up to 32 rows, with AMX), MKL with the parts as one matrix (40), one GEMM
    # per part (129).
    rng = np.random.default_rng(M + parts)
    x = rng.normal(size=(M, 96)).astype(np.float32)
    w = mkl_bf16.bits(mx.array(rng.normal(size=(64, 96)), mx.bfloat16))
    out = np.full((2, M, 64), np.nan, np.float32)
    got = mkl_bf16.rows_t(x, w, parts, out[1])
    assert np.shares_memory(got, out[1]) and np.array_equal(got, out[1])
    assert np.array_equal(out[1], mkl_bf16.rows_t(x, w, parts)) and np.isnan(out[0]).all()
    for bad, what in ((np.empty((M, 63), np.float32), r"shape \(%d, 64\), got float32 \(%d, 63\)" % (M, M)),
                      (np.empty((M, 64), np.float64), "got float64"),
                      (np.empty((M, 128), np.float32)[:, ::2], "strided")):
        with pytest.raises(ValueError, match=what):
            mkl_bf16.rows_t(x, w, parts, bad)


def products_of(model) -> dict[str, nn.Module]:
    return {p: m for p, m in model.net.named_modules() if isinstance(m, (mkl_bf16.Linear, mkl_bf16.Embedding))}


@needs_row_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_product_weights_are_multiplied_in_the_mapping_of_their_file(small_windows_dir, monkeypatch, dtype):
    file = small_windows_dir / "consolidated.safetensors"
    stored = mx.load(str(file))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = voxtral_mlx.load(small_windows_dir, dtype=dtype)
    peak = mx.get_peak_memory() - before
    products = products_of(model)
    assert products and all(m._mapped and isinstance(m._w, np.memmap) and Path(m._w.filename).samefile(file)
                            for m in products.values())
    for path, m in products.items():  # the stored bits, in the layer's own shape
        np.testing.assert_array_equal(m._w, np.asarray(stored[f"{path}.weight"].view(mx.uint16)), err_msg=path)
    # None of them was read into MLX's memory while loading: what it held at its peak is less
    # than the products' weights and about the rest of the parameters.
    mapped_bytes = sum(m._w.nbytes for m in products.values())
    rest = sum(p.nbytes for n, p in tree_flatten(model.net.parameters()) if n.removesuffix(".weight") not in products)
    assert peak < mapped_bytes and peak <= 1.1 * rest + 2**20, (peak, mapped_bytes, rest)

    # The same numbers as weights read into memory (the load before the mapping).
    monkeypatch.setattr(voxtral_mlx.weights, "mapped_products", lambda *args: {})
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    read = voxtral_mlx.load(small_windows_dir, dtype=dtype)
    assert mx.get_peak_memory() - before >= mapped_bytes + rest  # (what the peak above is measured against)
    assert products_of(read).keys() == products.keys() and not any(m._mapped for m in products_of(read).values())
    audio = speech("jfk")[: 4 * 16000]
    tokens = read.transcribe(audio).tokens
    assert model.transcribe(audio).tokens == tokens and len(set(tokens)) > 3
    np.testing.assert_array_equal(forced_logits(model, audio, tokens), forced_logits(read, audio, tokens))
    ids = mx.array([[0, 7, 1000], [3, 3, 2]])
    lookup = model.net.embedding_module.tok_embeddings(ids)
    assert lookup.dtype == mx.float32 and lookup.shape == (2, 3, model.net.args.decoder.dim)
    np.testing.assert_array_equal(np.array(lookup), np.array(read.net.embedding_module.tok_embeddings(ids)))
