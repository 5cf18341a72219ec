"""Decoder steps on the CPU in numpy around the kernels (host_step.py) against MLX's graphs."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import checkpoint

import voxtral_mlx
from voxtral_mlx import cpu_kernels, cpu_quant, host_step, mkl_bf16
from voxtral_mlx.convert import convert

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None,
                                reason=f"the CPU kernels are not available: {cpu_kernels.reason}")


@pytest.fixture(scope="module")
def models(ckpt_root, tmp_path_factory):
    """Quantized and bfloat16 (MKL) models with small windows and a ring of 20 positions, and
    the float32 original."""
    source = checkpoint(ckpt_root, enc_window=24, dec_window=20)
    root = tmp_path_factory.mktemp("host_step")
    out = {"float32": voxtral_mlx.load(source)}
    for bits, group in ((4, 32), (4, 64), (8, 64), (6, 64)):
        out[f"q{bits}-{group}"] = voxtral_mlx.load(convert(source, root / f"q{bits}-{group}", q_bits=bits,
                                                           q_group_size=group).path)
    if mkl_bf16.available():
        out["bfloat16"] = voxtral_mlx.load(source, dtype="bfloat16")
    return out


ADOPTED = ["q4-32", "q4-64", "q8-64",
           pytest.param("bfloat16", marks=pytest.mark.skipif(not mkl_bf16.available(), reason="MKL is not loaded"))]


def steps(model, inputs, tokens, spare, host, monkeypatch):
    """Logits [steps, B, vocab] of a prompt of 5 positions, then one position per step."""
    net = model.net
    with monkeypatch.context() as m:
        if not host:
            m.setattr(host_step, "fits", lambda *a: False)
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


@pytest.mark.parametrize("name", ADOPTED)
@pytest.mark.parametrize("spare", [0, 3])
def test_steps_on_the_host_give_the_logits_of_mlx_graphs(models, name, spare, monkeypatch):
    # 40 positions: the ring of 20 wraps; with spare slots, steps read it through a mask.
    model = models[name]
    inputs, tokens = random_inputs(model, 2, 40, seed=spare)
    calls = []
    real = host_step.decode
    monkeypatch.setattr(host_step, "decode", lambda *a: (calls.append(a[1].shape), real(*a))[1])
    got = steps(model, inputs, tokens, spare, True, monkeypatch)
    assert calls == [(2, 1, model.net.args.decoder.dim)] * 35
    want = steps(model, inputs, tokens, spare, False, monkeypatch)
    assert len(calls) == 35  # not through the host
    assert np.array_equal(got[0], want[0])  # the prompt's pass is MLX's either way
    if name != "bfloat16":
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        return
    # Each product rounds its input to bfloat16, which a last-bit difference in a value can
    # move by a bfloat16 step: the paths part by up to a few thousandths, each as far as the
    # other from the float32 model.
    exact = steps(models["float32"], inputs, tokens, spare, False, monkeypatch)
    scale = np.abs(exact).max()
    assert np.abs(got - want).max() <= 1e-2 * scale

    def rms(error):
        return np.sqrt(np.mean(error**2) / np.mean(exact**2))

    assert rms(got - exact) < 1.1 * rms(want - exact) < 3e-2


@pytest.mark.parametrize("name", ADOPTED)
def test_a_streams_numbers_do_not_depend_on_the_streams_beside_it(models, name, monkeypatch):
    model = models[name]
    if name == "bfloat16":
        # This model's head (1314 rows, not a multiple of 32) goes to MKL's GEMM, whose sums
        # depend on the number of rows: multiply it a row at a time. The 4B model's (131072
        # rows) takes the row kernel, as every other product here.
        head = model.net.embedding_module.tok_embeddings
        real = head.host
        monkeypatch.setattr(head, "host", lambda a: np.concatenate([real(a[i : i + 1]) for i in range(len(a))]))
    inputs, tokens = random_inputs(model, 3, 30, seed=7)
    together = steps(model, inputs, tokens, 2, True, monkeypatch)
    for b in range(3):
        alone = steps(model, inputs[b : b + 1], tokens[b : b + 1], 2, True, monkeypatch)
        assert np.array_equal(together[1:, b], alone[1:, 0])


def test_steps_go_to_the_host_where_every_product_is_a_kernel_on_numpy_rows(models):
    for name, model in models.items():
        caches = model.net.make_cache()
        adopted = cpu_quant.adopted(model.net) or mkl_bf16.adopted(model.net)
        assert host_step.fits(model.net, caches.decoder) == adopted == (name in ("q4-32", "q4-64", "q8-64", "bfloat16"))
    model = models["q4-64"]
    caches = model.net.make_cache()
    model.net.decode(mx.zeros((3, model.net.args.decoder.dim)), mx.array([1, 2, 3]), caches, model.net.ffn_scales(6))
    assert host_step.fits(model.net, caches.decoder)
    caches.decoder[-1].keys = caches.decoder[-1].keys.astype(mx.bfloat16)
    assert not host_step.fits(model.net, caches.decoder)


@pytest.mark.parametrize("position", [0, 1, 37, 8191, 10**6])
def test_rope_turns_interleaved_pairs_by_the_positions_angles(position):
    rng = np.random.default_rng(position)
    x = rng.normal(size=(2, 3, 64)).astype(np.float32)
    cos, sin = host_step.rotation(position, 64, 1e6)
    got = host_step.rope(x, cos, sin)
    angles = position * 1e6 ** (-np.arange(0, 64, 2) / 64)
    pairs = x.astype(np.float64).reshape(2, 3, 32, 2)
    want = np.stack([pairs[..., 0] * np.cos(angles) - pairs[..., 1] * np.sin(angles),
                     pairs[..., 0] * np.sin(angles) + pairs[..., 1] * np.cos(angles)], axis=-1).reshape(x.shape)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-6 * np.abs(want).max()
    if position < 1000:  # MLX's angles are float32: at 8191, 1e-4 off; the host's are float64
        mlx = np.array(mx.fast.rope(mx.array(x)[:, :, None], 64, traditional=True, base=1e6, scale=1.0,
                                    offset=position))[:, :, 0]
        assert np.abs(got - mlx).max() < 1e-5 * np.abs(want).max()
