"""Ring attention: the reference against float64 numpy, the Metal kernels against the reference
(in the CPU emulator everywhere, on the GPU where Metal exists), and the dispatcher.

Tolerances, per dtype (|a - b| <= tol + tol * |b|):
- EXACT: a kernel against float64 from the same inputs. The kernels accumulate in float32,
  so only the rounding of the output to the dtype remains (half an ulp of values below 2).
- LOOSE: anything against the reference. On the CPU MLX's SDPA rounds the scores to the
  dtype before the softmax, which costs bfloat16 about two ulps.
"""

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import msl_emu
from voxtral_mlx import kernels
from voxtral_mlx.kernels import RingAttentionKernels, ring_attention, ring_attention_reference

EXACT = {mx.float32: 2e-6, mx.float16: 1e-3, mx.bfloat16: 8e-3}
LOOSE = {mx.float32: 1e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}
DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
LAYOUTS = {"gqa": (1, 8, 2), "mha": (2, 2, 2)}  # (B, Hq, Hk)
D = 64


def ring(capacity: int, window: int, last: int, slots: int) -> dict:
    return {"capacity": capacity, "window": window, "last": last, "slots": slots}


# Ring states as functions of the number of queries n (at most 16).
RINGS = {
    # slots past `last` allocated but never written; S < capacity
    "before fill": lambda n: ring(24, 16, n + 2, n + 6),
    "exactly full": lambda n: ring(24, 16, 23, 24),
    # positions t-window (unseen) and t-window+1 (seen) are both in the ring
    "wrapped many times": lambda n: ring(24, 16, 24 * 7 + 5, 24),
    "capacity == window": lambda n: ring(20, 20, 20 * 3 + 11, 20),
    # spare slots so that every one of 16 queries has its whole window
    "spare slots": lambda n: ring(32, 16, 32 * 5 + 7, 32),
    # positions last-2 .. last map to slots 18..20, which do not exist
    "slots < capacity": lambda n: ring(24, 16, 20, 18),
}


@pytest.fixture(scope="module")
def emulated() -> RingAttentionKernels:
    """The kernels run by the CPU emulator, two simdgroups per threadgroup."""
    if msl_emu.find_clang() is None:
        pytest.skip("clang++-19 not found: apt install clang-19")
    return RingAttentionKernels(msl_emu.metal_kernel, simdgroups=2)


def random_case(layout: str, n: int, state: dict, dtype: mx.Dtype, seed: int = 0):
    B, Hq, Hk = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((B, Hq, n, D)), mx.float32).astype(dtype)
    keys, values = (mx.array(rng.standard_normal((B, Hk, state["slots"], D)), mx.float32).astype(dtype)
                    for _ in range(2))
    return q, keys, values


def call_args(state: dict) -> dict:
    return {"last": state["last"], "capacity": state["capacity"], "window": state["window"], "scale": 1 / math.sqrt(D)}


def as_float64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def attention_float64(q, keys, values, *, last, capacity, window, scale) -> np.ndarray:
    """The ring attention formula in float64 numpy."""
    q, keys, values = (as_float64(x) for x in (q, keys, values))
    n, group = q.shape[2], q.shape[1] // keys.shape[1]
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
    p = last - (last - np.arange(keys.shape[2])) % capacity
    t = np.arange(last - n + 1, last + 1)[:, None]
    visible = (p >= 0) & (p <= t) & (p > t - window)  # [n, S]
    scores = np.where(visible, np.einsum("bhqd,bhkd->bhqk", q, keys) * scale, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", w / w.sum(-1, keepdims=True), values)


def position_case(n: int, state: dict, dtype: mx.Dtype):
    """Zero queries (uniform attention) over values that hold each slot's position relative
    to `last`: the output is the mean position a query sees, so any key too many or too few
    shows in every dtype."""
    B, Hq, Hk = LAYOUTS["gqa"]
    last, capacity, slots = state["last"], state["capacity"], state["slots"]
    p = last - (last - np.arange(slots)) % capacity
    values = np.broadcast_to((p - last).astype(np.float32)[None, None, :, None], (B, Hk, slots, D))
    q = mx.zeros((B, Hq, n, D), dtype)
    keys = mx.array(np.random.default_rng(1).standard_normal((B, Hk, slots, D)), mx.float32).astype(dtype)
    t = np.arange(last - n + 1, last + 1)[:, None]
    visible = (p >= 0) & (p <= t) & (p > t - state["window"])
    expected = (visible * (p - last)).sum(-1) / visible.sum(-1)  # [n]
    return q, keys, mx.array(values).astype(dtype), np.broadcast_to(expected[None, None, :, None], (B, Hq, n, D))


def assert_close(actual: mx.array, expected, tol: float, what: str):
    expected = as_float64(expected) if isinstance(expected, mx.array) else np.asarray(expected, np.float64)
    np.testing.assert_allclose(as_float64(actual), expected, rtol=tol, atol=tol, err_msg=what)


# The reference


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_reference_matches_float64(n, layout, dtype):
    for name, make in RINGS.items():
        state = make(n)
        q, keys, values = random_case(layout, n, state, dtype)
        out = ring_attention_reference(q, keys, values, **call_args(state))
        assert out.dtype == dtype and out.shape == q.shape
        assert_close(out, attention_float64(q, keys, values, **call_args(state)), LOOSE[dtype], name)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_reference_sees_exactly_the_window(n):
    for name, make in RINGS.items():
        state = make(n)
        q, keys, values, expected = position_case(n, state, mx.float32)
        assert_close(ring_attention_reference(q, keys, values, **call_args(state)), expected, 1e-6, name)


def test_reference_is_plain_sdpa_for_one_query_over_a_full_window():
    """Decoding with a ring no longer than the window needs no mask: the reference is then
    exactly the unmasked SDPA call the attention code makes today."""
    for state in (ring(16, 16, 16 * 9 + 4, 16), ring(16, 16, 6, 7)):
        q, keys, values = random_case("gqa", 1, state, mx.bfloat16)
        plain = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1 / math.sqrt(D))
        assert mx.array_equal(ring_attention_reference(q, keys, values, **call_args(state)), plain)


# The kernel bodies under clang


def body_kernels() -> dict:
    if msl_emu.find_clang() is None:
        pytest.skip("clang++-19 not found: apt install clang-19")
    k = RingAttentionKernels(msl_emu.metal_kernel)
    return {"one pass": k.one_pass, "split": k.split, "reduce": k.reduce}


def check_body(kernel, dtype: mx.Dtype):
    """Type-checks one body for decoder-shaped inputs, as MLX would generate it."""
    if kernel.input_names[0] == "o_part":
        inputs = [mx.zeros((1, 32, 1, 4, 128)), mx.zeros((1, 32, 1, 4, 2))]
        kernel.check(inputs=inputs, template=[("T", dtype)], output_dtypes=[dtype])
        return
    inputs = [mx.zeros((1, 32, 1, 128), dtype), mx.zeros((1, 8, 64, 128), dtype), mx.zeros((1, 8, 64, 128), dtype),
              mx.zeros((5,), mx.int32)]
    outputs = [dtype] if kernel.output_names == ["out"] else [mx.float32, mx.float32]
    kernel.check(inputs=inputs, template=[("T", dtype), ("D", 128), ("R", 4), ("BN", 8)], output_dtypes=outputs)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("body", ["one pass", "split", "reduce"])
def test_kernel_body_compiles(body, dtype):
    check_body(body_kernels()[body], dtype)


@pytest.mark.parametrize("body, old, new", [
    ("one pass", "out[row * D + tid] =", "q[row * D + tid] ="),  # store through const device
    ("split", "(rows, j, tg_m,", "(rows, j, o_part,"),  # device memory where threadgroup is expected
    ("one pass", "const int last = params[0];",  # params (5 elements) is in the constant space
     "const device int32_t* p = params; const int last = p[0];"),
    ("reduce", "fast::exp(", "fast::expp("),
], ids=["const device store", "device as threadgroup", "constant as device", "typo"])
def test_broken_body_fails_to_compile(body, old, new):
    kernel = body_kernels()[body]
    assert old in kernel.source + kernel.header
    broken = msl_emu.metal_kernel(kernel.name, kernel.input_names, kernel.output_names,
                                  kernel.source.replace(old, new), kernel.header.replace(old, new))
    with pytest.raises(msl_emu.CompileError, match="error"):
        check_body(broken, mx.float16)


# The kernels in the emulator


@pytest.mark.parametrize("blocks", [1, 3], ids=["one pass", "split"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_emulated_kernel_matches_reference(emulated, n, layout, dtype, blocks):
    for name, make in RINGS.items():
        state = make(n)
        q, keys, values = random_case(layout, n, state, dtype, seed=n)
        out = emulated(q, keys, values, blocks=blocks, **call_args(state))
        assert out.dtype == dtype and out.shape == q.shape
        ref = ring_attention_reference(q, keys, values, **call_args(state))
        assert_close(out, ref, LOOSE[dtype], f"{name}: against the reference")
        assert_close(out, attention_float64(q, keys, values, **call_args(state)), EXACT[dtype], f"{name}: float64")


@pytest.mark.parametrize("blocks", [1, 2], ids=["one pass", "split"])
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_emulated_kernel_sees_exactly_the_window(emulated, n, blocks):
    for name, make in RINGS.items():
        state = make(n)
        q, keys, values, expected = position_case(n, state, mx.float32)
        assert_close(emulated(q, keys, values, blocks=blocks, **call_args(state)), expected, 1e-6, name)


@pytest.mark.parametrize("shape, window", [((1, 8, 2, 128), 12), ((1, 4, 4, 64), 10)], ids=["decoder", "encoder"])
def test_emulated_kernel_model_head_dims(emulated, shape, window):
    """The model's head dims (128 with GQA, 64 multi-head): with the production threadgroup
    size (8 simdgroups) and blocks of 8 keys, so that the kernel picks the split pass, and
    with the tests' kernels in one pass."""
    B, Hq, Hk, head_dim = shape
    production = RingAttentionKernels(msl_emu.metal_kernel, block_keys=8)
    rng = np.random.default_rng(3)
    state = ring(window + 4, window, 100, window + 4)
    q = mx.array(rng.standard_normal((B, Hq, 4, head_dim)), mx.float32).astype(mx.bfloat16)
    keys, values = (mx.array(rng.standard_normal((B, Hk, state["slots"], head_dim)), mx.float32).astype(mx.bfloat16)
                    for _ in range(2))
    args = {**call_args(state), "scale": 1 / math.sqrt(head_dim)}
    assert production.blocks(4, state["slots"], state["last"], state["capacity"], window) == 2
    expected = attention_float64(q, keys, values, **args)
    for kernels_ in (production, emulated):
        assert_close(kernels_(q, keys, values, **args), expected, EXACT[mx.bfloat16], "bf16")


def test_emulated_kernel_reads_strided_ring_in_place(emulated):
    """The first S slots of a larger buffer, and a transposed q, as the cache and the
    attention code hand them over: the kernel reads these views in place, by their strides."""
    rng = np.random.default_rng(4)
    state = ring(24, 16, 24 * 3 + 2, 20)
    buffer = rng.standard_normal((2, 1, 2, 32, D)).astype(np.float32)  # [K/V, B, Hk, allocated, D]
    keys, values = buffer[0, :, :, :20], buffer[1, :, :, :20]
    q = rng.standard_normal((1, 3, 8, D)).astype(np.float32).transpose(0, 2, 1, 3)  # [B, Hq, n, D] view
    kernel = emulated.one_pass
    params = mx.array([state["last"], 24, 16, 1, int(np.float32(1 / math.sqrt(D)).view(np.int32))], mx.int32)
    out = kernel(inputs=[q, keys, values, params], template=[("T", mx.float32), ("D", D), ("R", 8), ("BN", 2)],
                 grid=(64 * 2, 2, 1), threadgroup=(64, 1, 1), output_shapes=[q.shape], output_dtypes=[mx.float32])[0]
    expected = attention_float64(mx.array(q), mx.array(keys), mx.array(values), **call_args(state))
    assert_close(out, expected, EXACT[mx.float32], "strided")


# Real Metal


@pytest.mark.skipif(not kernels.metal_ready(), reason="needs Metal and the GPU as MLX's default device")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape, ring_state", [
    ((1, 32, 8, 128), ring(8192 + 16, 8192, 8192 * 2 + 100, 8192 + 16)),
    ((1, 32, 8, 128), ring(8192 + 16, 8192, 300, 512)),
    ((1, 32, 32, 64), ring(750, 750, 750 * 4 + 17, 750)),
], ids=["decoder wrapped", "decoder filling", "encoder"])
@pytest.mark.parametrize("n", [1, 4, 16])
def test_metal_kernel_matches_reference(n, shape, ring_state, dtype):
    B, Hq, Hk, head_dim = shape
    rng = np.random.default_rng(n)
    q = mx.array(rng.standard_normal((B, Hq, n, head_dim)), mx.float32).astype(dtype)
    keys, values = (mx.array(rng.standard_normal((B, Hk, ring_state["slots"], head_dim)), mx.float32).astype(dtype)
                    for _ in range(2))
    args = {**call_args(ring_state), "scale": 1 / math.sqrt(head_dim)}
    ref = ring_attention_reference(q, keys, values, **args)
    k = kernels.metal_kernels()
    for blocks in (None, 1, 4):
        assert_close(k(q, keys, values, blocks=blocks, **args), ref, LOOSE[dtype], f"blocks={blocks}")


# The dispatcher


def test_dispatcher_uses_the_reference_here(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    state = RINGS["wrapped many times"](5)
    q, keys, values = random_case("gqa", 5, state, mx.bfloat16)
    expected = ring_attention_reference(q, keys, values, **call_args(state))
    for mode in ("auto", "off"):
        monkeypatch.setenv(kernels.ENV, mode)
        assert mx.array_equal(ring_attention(q, keys, values, **call_args(state)), expected)


def test_forcing_the_kernel_without_metal_is_an_error(monkeypatch):
    monkeypatch.setattr(kernels, "metal_ready", lambda: False)
    monkeypatch.setenv(kernels.ENV, "on")
    state = RINGS["exactly full"](1)
    q, keys, values = random_case("gqa", 1, state, mx.float32)
    with pytest.raises(RuntimeError, match="VOXTRAL_MLX_KERNELS=on needs Metal"):
        ring_attention(q, keys, values, **call_args(state))
    monkeypatch.setenv(kernels.ENV, "yes")
    with pytest.raises(ValueError, match="use on, off or auto"):
        ring_attention(q, keys, values, **call_args(state))


def test_auto_follows_the_measured_table(monkeypatch):
    monkeypatch.setattr(kernels, "metal_ready", lambda: True)
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "KERNEL_WINS", ())
    assert not kernels.use_kernel(1, 8192, 128)
    monkeypatch.setattr(kernels, "KERNEL_WINS", ((128, 8, 2048),))
    assert kernels.use_kernel(1, 8192, 128) and kernels.use_kernel(8, 2048, 128)
    assert not kernels.use_kernel(9, 8192, 128) and not kernels.use_kernel(1, 2047, 128)
    assert not kernels.use_kernel(1, 8192, 64)
    monkeypatch.setattr(kernels, "metal_ready", lambda: False)
    assert not kernels.use_kernel(1, 8192, 128)


def test_dispatcher_runs_the_kernel_where_chosen(emulated, monkeypatch):
    """With Metal faked and the kernel forced on, `ring_attention` goes through the kernels
    (here the emulated ones); shapes they do not support go to the reference."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return emulated(*args, **kwargs)

    monkeypatch.setattr(kernels, "metal_ready", lambda: True)
    monkeypatch.setattr(kernels, "metal_kernels", lambda: spy)
    monkeypatch.setenv(kernels.ENV, "on")
    state = RINGS["wrapped many times"](2)
    q, keys, values = random_case("gqa", 2, state, mx.float32)
    out = ring_attention(q, keys, values, **call_args(state))
    assert calls == [q.shape]
    assert_close(out, ring_attention_reference(q, keys, values, **call_args(state)), LOOSE[mx.float32], "kernel")
    odd = [x[..., :48] for x in (q, keys, values)]  # head dim 48: not a multiple of 32
    assert mx.array_equal(ring_attention(*odd, **call_args(state)), ring_attention_reference(*odd, **call_args(state)))
    assert len(calls) == 1


# Packaging


def test_kernel_sources_are_found_and_shipped():
    names = {"ring_attention_header.metal", "ring_attention.metal", "ring_attention_split.metal",
             "ring_attention_reduce.metal", "cpu_rows.c"}
    assert names <= {p.name for p in kernels.kernel_dir().iterdir()}
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    wheel = tomllib.loads(pyproject.read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["force-include"]["kernels"] == "voxtral_mlx/kernel_sources"


# The model's attention on the in-place ring path, which the kernels take on Metal: here with
# the reference in the kernels' place, so that the path itself is checked on any machine.


@pytest.mark.parametrize("speculate", [0, 8])
def test_model_on_the_in_place_ring_path_gives_the_same_tokens(small_windows_dir, monkeypatch, speculate):
    from conftest import load_mlx, speech

    model = load_mlx(small_windows_dir)  # MLX's graphs, which the Metal kernels serve
    audio = speech("jfk")
    expected = model.transcribe(audio, speculate=speculate)
    chunked = model.stream(speculate=speculate)
    for i in range(0, audio.size, 7000):
        chunked.feed(audio[i : i + 7000])
    chunked.finish()
    assert chunked.tokens == expected.tokens

    calls = []

    def in_place(q, keys, values, **ring):
        calls.append((q.shape[2], q.shape[3], ring["capacity"] - ring["window"]))
        return ring_attention_reference(q, keys, values, **ring)

    monkeypatch.setattr(kernels, "enabled", lambda: True)
    monkeypatch.setattr(kernels, "use_kernel", lambda n, slots, head_dim: True)
    monkeypatch.setattr(kernels, "ring_attention", in_place)
    assert model.transcribe(audio, speculate=speculate).tokens == expected.tokens
    session = model.stream(speculate=speculate)
    for i in range(0, audio.size, 7000):
        session.feed(audio[i : i + 7000])
    session.finish()
    assert session.tokens == expected.tokens
    args = model.net.args
    encoder = [(n, d) for n, d, spare in calls if spare == 511]
    decoder = [(n, d) for n, d, spare in calls if spare == max(speculate - 1, 0)]
    # Every encoder pass (up to 4 x 128 frames, with 511 spare slots) and every decoder pass
    # (a step, or a speculative pass of up to 8 with 7 spare slots) read the ring in place.
    assert len(encoder) + len(decoder) == len(calls)
    assert {d for _, d in encoder} == {args.encoder.head_dim} and {d for _, d in decoder} == {args.decoder.head_dim}
    assert (max(n for n, _ in decoder) > 1) == (speculate > 1) and max(n for n, _ in encoder) > 1
