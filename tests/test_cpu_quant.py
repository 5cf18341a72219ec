"""The quantized kernels (kernels/cpu_rows.c `q_rows`, `q_amx` and `q_vnni`, cpu_kernels.q_rows_t
and q_packed_t) and the CPU quantized layers that use them (cpu_quant.py)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import forced_logits, load_model, speech

import voxtral_mlx
from voxtral_mlx import cpu_kernels, cpu_quant, mkl_bf16
from voxtral_mlx.convert import convert
from voxtral_mlx.streaming import StreamingSession

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None,
                                  reason=f"the quantized row kernel is not available: {cpu_kernels.reason}")
needs_amx = pytest.mark.skipif(not cpu_kernels.amx(), reason=f"the AMX kernels are not available: {cpu_kernels.amx_reason}")
needs_vnni = pytest.mark.skipif(cpu_kernels.library() is None or not set(cpu_kernels.VNNI_FLAGS) <= cpu_kernels.cpu_flags(),
                                reason="needs the kernels and AVX-512 VNNI")
needs_packed = pytest.mark.skipif(cpu_kernels.packed_kernel() is None,
                                  reason=f"the packed quantized kernel is not available: {cpu_kernels.packed_reason}")


def quantized(rng, N: int, K: int, bits: int, group: int):
    """A random weight as `mx.quantize` stores it (numpy) and its float64 dequantization."""
    q, s, b = mx.quantize(mx.array(rng.normal(size=(N, K)), mx.float32), group_size=group, bits=bits)
    exact = np.array(mx.dequantize(q, s, b, group_size=group, bits=bits), np.float64)
    return (np.array(q), np.array(s), np.array(b)), exact


def call(kernel: str, x: np.ndarray, w, bits: int, group: int, threads: int, parts: int = 4) -> np.ndarray:
    """One of the kernels on a given number of threads (q_amx, q_vnni: x in `parts` parts)."""
    q, s, b = w
    out = np.empty((x.shape[0], q.shape[0]), np.float32)
    lib, rows = cpu_kernels.library(), x.shape[0]
    if kernel == "q_rows":
        scratch = np.empty(x.size, np.float32)
        used = lib.q_rows(x.ctypes.data, q.ctypes.data, s.ctypes.data, b.ctypes.data, out.ctypes.data, rows,
                          q.shape[0], x.shape[1], bits, group, threads, scratch.ctypes.data)
    else:
        p = cpu_kernels.q_pack(q, s, b, bits, group)
        used = getattr(lib, kernel)(x.ctypes.data, p.weight.ctypes.data, p.scales.ctypes.data, p.biases.ctypes.data,
                                    out.ctypes.data, rows, q.shape[0], x.shape[1], bits, group, parts, threads, 0)
    assert used == threads
    return out


def through(kernel: str, parts: int = 3):
    """`cpu_kernels.q_packed_t` through `kernel` ("q_amx" or "q_vnni"), whichever this CPU would
    take, x in `parts` parts."""

    def product(x, q, s, b, bits, group):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(cpu_kernels, "packed_kernel", lambda: "AMX" if kernel == "q_amx" else "VNNI")
            return cpu_kernels.q_packed_t(x, cpu_kernels.q_pack(q, s, b, bits, group), parts=parts)

    return product


MARKS = {"q_rows": needs_kernel, "q_amx": needs_amx, "q_vnni": needs_vnni}
KERNELS = [pytest.param(kernel, marks=mark) for kernel, mark in MARKS.items()]
PRODUCT = {"q_rows": lambda *a: cpu_kernels.q_rows_t(*a), "q_amx": through("q_amx"), "q_vnni": through("q_vnni")}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kernel,M,N,K,group", [
    *(pytest.param("q_rows", *shape, marks=needs_kernel)
      for shape in ((1, 32, 32, 32), (3, 70, 96, 32), (4, 64, 256, 64), (5, 33, 384, 128), (33, 96, 3072, 64))),
    # q_amx, q_vnni: rows in tiles of up to 5 (x in three parts), or of up to 4 (four parts),
    # the last padded; 16 weight rows at a time (the last part-empty); odd and even numbers of
    # groups (q_amx: two sets of tiles alternate)
    *(pytest.param(kernel, *shape, marks=MARKS[kernel]) for kernel in ("q_amx", "q_vnni")
      for shape in ((1, 32, 64, 64), (3, 70, 192, 64), (7, 48, 512, 64), (17, 50, 128, 128), (33, 96, 3072, 64),
                    (40, 40, 1280, 128), (20, 24, 1280, 64), (32, 16, 640, 128), (46, 8, 192, 64)))])
def test_products_are_float32_sums_with_the_dequantized_weight(kernel, bits, M, N, K, group):
    rng = np.random.default_rng(M * N + K + bits + group)
    w, exact = quantized(rng, N, K, bits, group)
    x = rng.normal(size=(M, K)).astype(np.float32)
    want = x.astype(np.float64) @ exact.T
    bound = 1e-6 * np.sqrt(K) * (np.abs(x) @ np.abs(exact).T)
    for product in [PRODUCT[kernel]] + ([through(kernel, 4)] if kernel != "q_rows" else []):
        got = product(x, *w, bits, group)
        assert got.shape == (M, N) and got.dtype == np.float32
        assert np.all(np.abs(got - want) <= 8 * bound)


@pytest.mark.parametrize("kernel,bits,group", [
    pytest.param("q_rows", 4, 32, marks=needs_kernel), pytest.param("q_rows", 4, 128, marks=needs_kernel),
    pytest.param("q_rows", 8, 64, marks=needs_kernel),
    *(pytest.param(kernel, bits, group, marks=MARKS[kernel])
      for kernel in ("q_amx", "q_vnni") for bits in (4, 8) for group in (64, 128))])
def test_every_value_is_dequantized_in_place_as_mlx_does(kernel, bits, group):
    # One-hot rows pick single weights: out[m, n] is the dequantized w[n, k_m] itself.
    rng = np.random.default_rng(bits + group)
    N, K = 40, 256
    w, exact = quantized(rng, N, K, bits, group)
    got = PRODUCT[kernel](np.eye(K, dtype=np.float32), *w, bits, group)
    assert np.array_equal(got, exact.T.astype(np.float32))
    for k in range(0, K, 32):  # and in tiles of four parts (q_amx, q_vnni)
        for product in [PRODUCT[kernel]] + ([through(kernel, 4)] if kernel != "q_rows" else []):
            assert np.array_equal(product(np.eye(K, dtype=np.float32)[k : k + 32], *w, bits, group),
                                  exact.T[k : k + 32].astype(np.float32))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_gets_the_same_bits_whatever_rows_and_threads_surround_it(kernel, bits):
    # q_amx, q_vnni: the integer sums are exact and the rest is per row, wherever it sits in a
    # tile, for either number of parts; q_packed_t splits x in three parts for any rows, q_rows_t
    # takes up to MAX_ROWS.
    rng = np.random.default_rng(bits)
    K, N = 1024, 200
    w, _ = quantized(rng, N, K, bits, 64)
    x = rng.normal(size=(40, K)).astype(np.float32)
    for parts in (3, 4) if kernel != "q_rows" else (4,):
        alone = np.concatenate([call(kernel, x[i : i + 1], w, bits, 64, 1, parts) for i in range(40)])
        for m in (2, 3, 4, 5, 6, 9, 16, 17, 40):
            for threads in (1, 2, 3):
                assert np.array_equal(call(kernel, x[:m], w, bits, 64, threads, parts), alone[:m]), (m, threads, parts)
        if parts == (4 if kernel == "q_rows" else 3):  # the parts of PRODUCT
            assert np.array_equal(PRODUCT[kernel](x[5:12], *w, bits, 64)[3], alone[8])
            rows = 32 if kernel == "q_rows" else 40
            assert np.array_equal(PRODUCT[kernel](x[:rows], *w, bits, 64), alone[:rows])


@needs_kernel
def test_q_rows_t_refuses_what_it_cannot_multiply():
    rng = np.random.default_rng(0)
    w, _ = quantized(rng, 32, 128, 8, 64)
    x = np.ones((2, 128), np.float32)
    with pytest.raises(ValueError, match="needs a contiguous uint32 weight of 32 columns and float32 scales"):
        cpu_kernels.q_rows_t(x, w[0], w[1].astype(np.float16), w[2], 8, 64)
    with pytest.raises(ValueError, match="needs a contiguous uint32 weight of 24 columns"):
        cpu_kernels.q_rows_t(x, *w, 6, 64)
    six, _ = quantized(rng, 32, 128, 6, 64)
    with pytest.raises(ValueError, match=r"^the quantized kernel takes 4 or 8 bits in groups of 32, 64 or 128 \(6"):
        cpu_kernels.q_rows_t(x, *six, 6, 64)
    assert not cpu_kernels.q_fits(8, 64, 96) and not cpu_kernels.q_fits(8, 16, 128) and cpu_kernels.q_fits(4, 32, 96)
    assert not cpu_kernels.q_fits(8, 96, 192)  # a multiple of 32, but no group size of MLX's


@needs_kernel
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 128)])
def test_dequantize_gives_the_values_of_mx_dequantize(bits, group):
    w, exact = quantized(np.random.default_rng(bits * group), 70, 384, bits, group)
    assert np.array_equal(cpu_kernels.q_dequantize(*w, bits, group), exact.astype(np.float32))


# The packed kernels (q_amx, q_vnni): the same products as exact 8-bit integer products


@needs_amx
@needs_vnni
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128)])
def test_vnni_gives_the_bits_of_amx(bits, group):
    rng = np.random.default_rng(bits + group)
    (q, s, b), _ = quantized(rng, 70, 384, bits, group)
    halves = [np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32)) for a in (s, b)]
    for scales in ((s, b), halves):
        packed = cpu_kernels.q_pack(q, *scales, bits, group).halved()
        for rows in (1, 4, 5, 32, 33, 40):  # tiles of 1 to 4 rows in four parts, 1 to 5 in three
            x = rng.normal(size=(rows, 384)).astype(np.float32)
            assert np.array_equal(call("q_vnni", x, (q, *scales), bits, group, 2, 4 if rows <= 32 else 3),
                                  call("q_amx", x, (q, *scales), bits, group, 2, 4 if rows <= 32 else 3)), rows
            assert np.array_equal(through("q_vnni")(x, q, *scales, bits, group), cpu_kernels.q_packed_t(x, packed))


@needs_packed
@pytest.mark.parametrize("rows,bits_kept", [(5, 28), (40, 21), (5, 21)])
def test_packed_rows_of_any_scale_hold_21_or_28_bits_below_each_groups_largest_value(rows, bits_kept):
    # Each group of a row is split below its own largest value, in three parts (21 bits), or
    # four (28) on request: a value 2^15 times the others costs them 15 of those bits (the sums
    # stay within 2^(1 - bits) of the largest times the weights); values of 1e-30 or 1e30 lose
    # nothing; a row of zeros gives exact zeros.
    rng = np.random.default_rng(3)
    K, N, group = 256, 48, 64
    w, exact = quantized(rng, N, K, 4, group)
    x = rng.normal(size=(rows, K)).astype(np.float32)
    x[0, 5] = 3e4
    x[1] *= np.float32(1e-30)
    x[2] *= np.float32(1e30)
    x[3] = 0
    x[4, 64:192] = 0
    got = cpu_kernels.q_packed_t(x, cpu_kernels.q_pack(*w, 4, group), parts=bits_kept // 7)
    want = x.astype(np.float64) @ exact.T
    largest = np.abs(x).astype(np.float64).reshape(rows, K // group, group).max(axis=2)  # [rows, groups]
    by_group = np.abs(exact).reshape(N, K // group, group).sum(axis=2)                # [N, groups]
    rounding = 8e-6 * np.sqrt(K) * (np.abs(x).astype(np.float64) @ np.abs(exact).T)
    assert np.all(np.abs(got - want) <= rounding + 2.0 ** (1 - bits_kept) * largest @ by_group.T)
    assert np.all(np.abs(got - want)[1:] <= rounding[1:])
    assert np.all(got[3] == 0)
    if bits_kept == 28:  # the value 3e4 sits 15 bits above the others: 13 of their 28 kept, not 6 of 21
        three = cpu_kernels.q_packed_t(x, cpu_kernels.q_pack(*w, 4, group))
        assert np.abs(got[0] - want[0]).max() < np.abs(three[0] - want[0]).max() / 16


@needs_packed
def test_q_pack_and_q_packed_t_refuse_what_they_cannot_multiply():
    rng = np.random.default_rng(0)
    w, _ = quantized(rng, 16, 128, 4, 32)
    x = np.ones((1, 128), np.float32)
    with pytest.raises(ValueError, match="groups of 64 or 128"):
        cpu_kernels.q_pack(*w, 4, 32)
    w, _ = quantized(rng, 16, 128, 4, 64)
    with pytest.raises(ValueError, match="float32 scales and biases of 128 / 64 columns"):
        cpu_kernels.q_pack(w[0], w[1][:, :1].copy(), w[2], 4, 64)
    with pytest.raises(ValueError, match="^q_pack packs in place only writable weights of a multiple of 16 rows"):
        cpu_kernels.q_pack(*(a[:15].copy() for a in w), 4, 64, in_place=True)
    packed = cpu_kernels.q_pack(*w, 4, 64)
    assert cpu_kernels.q_packed_t(x[:0], packed).shape == (0, 16)
    with pytest.raises(ValueError, match=r"^q_packed_t: rows of 64 values by a weight of 128 columns, 4 bits in"):
        cpu_kernels.q_packed_t(x[:, :64], packed)
    with pytest.raises(ValueError, match=r"of 128 columns, 6 bits in groups of 64, x in 3 parts \(it takes 4 or 8 bits"):
        cpu_kernels.q_packed_t(x, packed._replace(bits=6, weight=np.zeros((1, 1536), np.uint8)))
    product = getattr(cpu_kernels.library(), "q_amx" if cpu_kernels.packed_kernel() == "AMX" else "q_vnni")
    assert product(x.ctypes.data, packed.weight.ctypes.data, packed.scales.ctypes.data, packed.biases.ctypes.data,
                   np.empty(16, np.float32).ctypes.data, 1, 16, 128, 4, 64, 5, 1, 0) == 0  # five parts: nothing computed
    assert product(x.ctypes.data, packed.weight.ctypes.data, packed.scales.ctypes.data, packed.biases.ctypes.data,
                   0, 0, 16, 128, 4, 64, 4, 2, 0) == 1  # no rows
    assert not cpu_kernels.q_packed_fits(8, 64, 96) and not cpu_kernels.q_packed_fits(4, 32, 128)
    assert cpu_kernels.q_packed_fits(8, 128, 256)


@needs_packed
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128)])
def test_bfloat16_scales_are_stored_as_their_bits_with_the_same_products(bits, group):
    rng = np.random.default_rng(group)
    (q, s, b), _ = quantized(rng, 70, 384, bits, group)
    halves = [np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32)) for a in (s, b)]
    packed = cpu_kernels.q_pack(q, *halves, bits, group)
    halved = packed.halved()
    assert halved.scales.dtype == halved.biases.dtype == np.uint16 and halved.scales.shape == packed.scales.shape
    assert halved.halved() is halved and np.array_equal(halved.rows(np.arange(70)), packed.rows(np.arange(70)))
    for rows, parts in ((1, 4), (4, 3), (33, 3)):
        x = rng.normal(size=(rows, 384)).astype(np.float32)
        assert np.array_equal(cpu_kernels.q_packed_t(x, halved, parts=parts),
                              cpu_kernels.q_packed_t(x, packed, parts=parts)), rows
    # Scales that bfloat16 does not hold stay float32.
    full = cpu_kernels.q_pack(q, s, b, bits, group)
    assert full.halved() is full and full.scales.dtype == np.float32


@needs_packed
def test_float32_scales_stay_float32_in_the_model(tiny_dir, tmp_path):
    path = convert(tiny_dir, tmp_path / "q4", q_bits=4, q_group_size=64, dtype="float32").path
    layers = [m for _, m in voxtral_mlx.load(path).net.named_modules() if isinstance(m, cpu_quant.Linear)]
    assert layers and all(m._packed for m in layers)
    # mx.quantize's float32 scales: most are not bfloat16 values.
    assert all(m.scales.dtype == m.biases.dtype == mx.float32 for m in layers)


@needs_packed
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128)])
def test_packed_rows_are_the_values_of_mx_dequantize(bits, group):
    # An embedding's lookup from the stored layout: any rows, the last block part-empty.
    w, exact = quantized(np.random.default_rng(bits), 70, 384, bits, group)
    packed = cpu_kernels.q_pack(*w, bits, group)
    assert packed.weight.shape == (5, 16 * 384 * bits // 8) and packed.scales.shape == (5, 384 // group, 16)
    assert np.array_equal(packed.rows(np.arange(70)), exact.astype(np.float32))
    assert np.array_equal(packed.rows(np.array([[69, 3], [16, 16]])), exact[[69, 3, 16, 16]].astype(np.float32))
    assert np.all(packed.scales[4, :, 6:] == 0)  # rows 70..79: zeros
    with pytest.raises(IndexError, match="rows 3..70 of a weight of 70"):
        packed.rows(np.array([3, 70]))


# The model's quantized layers on the CPU


@needs_kernel
@pytest.mark.skipif(not mkl_bf16.available(), reason="MKL is not loaded")
def test_many_rows_multiply_dequantized_blocks_through_mkl(monkeypatch):
    rng = np.random.default_rng(7)
    K, N = 256, 70
    monkeypatch.setattr(cpu_kernels, "q_packed_fits", lambda *a: False)  # the path of CPUs without AMX or VNNI
    layer = cpu_quant.Linear(nn.QuantizedLinear(K, N, bias=True, group_size=64, bits=8))
    exact = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 8), np.float64)
    calls = []
    for name in ("q_rows_t", "q_dequantize"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, real=real, name=name: (calls.append((name, a[0].shape[0])),
                                                                                  real(*a))[1])
    monkeypatch.setattr(cpu_kernels, "WIDENED", 16 * K)  # blocks of 16 weight rows: 16, 16, 16, 16, 6
    for rows, expected in ((32, [("q_rows_t", 32)]), (33, [("q_dequantize", 16)] * 4 + [("q_dequantize", 6)])):
        calls.clear()
        x = rng.normal(size=(1, rows, K)).astype(np.float32)
        got = np.array(layer(mx.array(x)))
        want = x[0].astype(np.float64) @ exact.T + np.array(layer.bias)
        assert calls == expected and got.shape == (1, rows, N)
        assert np.abs(got[0] - want).max() < 1e-5 * np.abs(want).max()


def test_without_the_packed_kernel_many_rows_multiply_dequantized_blocks_in_the_row_kernel(monkeypatch):
    if cpu_kernels.library() is None:
        pytest.skip(f"no kernel library: {cpu_kernels.reason}")
    rng = np.random.default_rng(8)
    K, N = 256, 96
    monkeypatch.setattr(cpu_kernels, "q_packed_fits", lambda *a: False)
    layer = cpu_quant.Linear(nn.QuantizedLinear(K, N, bias=False, group_size=64, bits=4))
    exact = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4), np.float64)
    calls = []
    real = cpu_kernels.q_dequantize
    monkeypatch.setattr(cpu_kernels, "q_dequantize", lambda *a: (calls.append(a[0].shape[0]), real(*a))[1])
    monkeypatch.setattr(cpu_kernels, "DEQUANTIZED", 40 * K)  # blocks of 32 weight rows (whole multiples of 32)
    x = rng.normal(size=(45, K)).astype(np.float32)
    got = cpu_quant.product(layer, x)
    assert calls == [32, 32, 32]
    want = x.astype(np.float64) @ exact.T
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    # The kernel gives each row its own bits, whatever rows (more than MAX_ROWS) surround it.
    assert np.array_equal(cpu_quant.product(layer, np.ascontiguousarray(x[10:43])), got[10:43])


@needs_packed
def test_with_the_packed_kernel_every_product_goes_through_it(monkeypatch):
    rng = np.random.default_rng(8)
    K, N = 256, 70
    source = nn.QuantizedLinear(K, N, bias=True, group_size=64, bits=4)
    exact = np.array(mx.dequantize(source.weight, source.scales, source.biases, 64, 4), np.float64)
    layer = cpu_quant.Linear(source)
    assert layer._packed and layer.weight.shape == (5, 16 * K // 2)  # stored for the kernel
    calls = []
    for name in ("q_rows_t", "q_packed_t", "q_dequantize"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, real=real, name=name: (calls.append((name, a[0].shape[0])),
                                                                                  real(*a))[1])
    for rows in (1, 4, 32, 33, 376):
        calls.clear()
        x = rng.normal(size=(1, rows, K)).astype(np.float32)
        got = np.array(layer(mx.array(x)))
        want = x[0].astype(np.float64) @ exact.T + np.array(layer.bias)
        assert calls == [("q_packed_t", rows)] and got.shape == (1, rows, N)
        assert np.abs(got[0] - want).max() < 1e-5 * np.abs(want).max()
    # Rows in whole blocks of 16: stored in the loaded weight's own memory, nothing copied.
    source = nn.QuantizedLinear(K, 64, bias=False, group_size=64, bits=8)
    exact = np.array(mx.dequantize(source.weight, source.scales, source.biases, 64, 8), np.float64)
    where = np.asarray(source.weight).ctypes.data
    layer = cpu_quant.Linear(source)
    assert layer.weight.shape == (4, 16 * K) and np.asarray(layer.weight).ctypes.data == where
    x = rng.normal(size=(3, K)).astype(np.float32)
    assert np.abs(layer.host(x) - x @ exact.T).max() < 1e-5 * np.abs(x @ exact.T).max()


@pytest.fixture(scope="module")
def quantized_dirs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_quant")
    return {(bits, group): convert(tiny_dir, root / f"q{bits}-{group}", q_bits=bits, q_group_size=group).path
            for bits, group in ((4, 32), (4, 64), (8, 64), (6, 64))}


def mlx_model(path, monkeypatch):
    """The same model with MLX's own quantized products."""
    with monkeypatch.context() as m:
        m.setattr(cpu_quant, "available", lambda: False)
        return load_model(path)


@needs_kernel
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 64)])
def test_layers_take_the_kernel_and_keep_mlx_logits(quantized_dirs, bits, group, monkeypatch):
    model = load_model(quantized_dirs[bits, group], dtype="bfloat16")
    layers = [m for _, m in model.net.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers and all(isinstance(m, (cpu_quant.Linear, cpu_quant.Embedding)) for m in layers)
    packed = cpu_kernels.packed_kernel() is not None and group in cpu_kernels.Q_PACKED_GROUPS
    assert all(m._packed == packed for m in layers) and model.dtype == mx.float32
    # The checkpoint's bfloat16 scales and biases: float32, or their bits where the packed kernel multiplies.
    assert all(m.scales.dtype == m.biases.dtype == (mx.uint16 if packed else mx.float32) for m in layers)
    kernel = {"AMX": "AMX", "VNNI": "AVX-512 VNNI"}[cpu_kernels.packed_kernel()] if packed else "AVX-512"
    assert cpu_quant.describe(model.net) == f"{bits}-bit products through the {kernel} kernel, float32 elsewhere"
    reference = mlx_model(quantized_dirs[bits, group], monkeypatch)
    assert not cpu_quant.adopted(reference.net)
    audio = speech("jfk")[:48000]
    tokens = reference.transcribe(audio).tokens
    got, want = forced_logits(model, audio, tokens), forced_logits(reference, audio, tokens)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@needs_kernel
def test_six_bit_layers_keep_mlx_products(quantized_dirs):
    model = load_model(quantized_dirs[6, 64])
    layers = [m for _, m in model.net.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers and not any(isinstance(m, (cpu_quant.Linear, cpu_quant.Embedding)) for m in layers)
    assert cpu_quant.describe(model.net) is None


@needs_kernel
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 64)])
def test_quantized_batch_and_speculation_give_the_single_file_tokens(quantized_dirs, bits, group):
    model = voxtral_mlx.load(quantized_dirs[bits, group])
    clips = [speech("jfk")[:48000], speech("night1968_5s")[:64000], speech("jfk")[16000:40000]]
    single = [model.transcribe(c, speculate=0).tokens for c in clips]
    assert len(set(map(tuple, single))) == 3
    assert [r.tokens for r in model.transcribe(clips, batch_size=3)] == single
    assert model.transcribe(clips[1], speculate=8).tokens == single[1]


@needs_kernel
def test_batches_hold_no_more_files_than_the_row_kernel_takes(quantized_dirs, monkeypatch):
    # The row kernels read the weights once for at most MAX_ROWS streams; with room for two
    # rows, three files are decoded as a batch of two and one, each with its own tokens.
    model = voxtral_mlx.load(quantized_dirs[4, 64])
    clips = [speech("jfk")[:32000], speech("night1968_5s")[:32000], speech("jfk")[16000:40000]]
    single = [model.transcribe(c, speculate=0).tokens for c in clips]
    monkeypatch.setattr(cpu_kernels, "MAX_ROWS", 2)
    sizes = []
    real = StreamingSession.lockstep
    monkeypatch.setattr(StreamingSession, "lockstep",
                        lambda net, tokenizer, audio, n, **kw: (sizes.append(n), real(net, tokenizer, audio, n, **kw))[1])
    assert [r.tokens for r in model.transcribe(clips, batch_size=3)] == single and sizes == [2, 1]


@needs_kernel
@pytest.mark.parametrize("group", [32, 64])  # 32: q_rows_t, and f32_rows or MKL beyond 32 rows; 64: q_packed_t
@pytest.mark.parametrize("M", [5, 40])
def test_a_layers_products_written_into_a_given_array_are_those_returned(group, M):
    mx.random.seed(M + group)
    layer = cpu_quant.Linear(nn.QuantizedLinear.from_linear(nn.Linear(256, 64), group_size=group, bits=4))
    assert "bias" in layer and layer.host_features == 64
    assert layer.host_stacks == (group == 64 and cpu_kernels.packed_kernel() is not None)  # rows of several streams as one product
    x = np.random.default_rng(M).normal(size=(M, 256)).astype(np.float32)
    out = np.full((2, M, 64), np.nan, np.float32)
    got = layer.host(x, out[1])
    assert np.shares_memory(got, out[1]) and np.array_equal(out[1], layer.host(x)) and np.isnan(out[0]).all()
    assert np.array_equal(out[1], np.array(layer(mx.array(x))))  # the bias added once, as MLX's path adds it
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float32 array of shape \(%d, 64\)" % M):
        layer.host(x, np.empty((M, 65), np.float32))


@needs_packed
@pytest.mark.parametrize("bits", [4, 8])
def test_packed_layers_split_x_in_three_parts_for_any_rows(quantized_dirs, bits):
    # A step's row, a streaming chunk's 4 rows or a speculative pass's 8 get the bits of the
    # same rows in a prompt or an offline chunk.
    net = voxtral_mlx.load(quantized_dirs[bits, 64]).net
    layers = [m for _, m in net.named_modules() if isinstance(m, (cpu_quant.Linear, cpu_quant.Embedding))]
    assert layers and all(m._packed and m.host_rows_exact(1000) for m in layers)
    for layer in (net.encoder.transformer.layers[0].feed_forward.w1, net.layers[0].attention.wq):
        x = np.random.default_rng(bits).normal(size=(40, layer._q.k)).astype(np.float32)
        many = layer.host(x)
        four = layer.host(x[:4])
        assert np.array_equal(four, many[:4]) and np.array_equal(four, cpu_kernels.q_packed_t(x[:4], layer._q, parts=3))
        assert not np.array_equal(four, cpu_kernels.q_packed_t(x[:4], layer._q, parts=4))  # 28 bits: other bits
        exact = x[:4].astype(np.float64) @ layer._q.rows(np.arange(layer._q.n)).astype(np.float64).T
        assert np.abs(four - exact).max() <= 1e-5 * np.abs(exact).max()
    with pytest.raises(ValueError, match=r"x in 5 parts \(it takes 4 or 8 bits in groups of 64 or 128, x in 3 or 4"):
        cpu_kernels.q_packed_t(x[:4], layer._q, parts=5)
