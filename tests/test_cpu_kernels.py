"""The row kernels for bfloat16 weights (kernels/cpu_rows.c, cpu_kernels.py): AMX's, and the
AVX-512 one of CPUs without AMX (each test runs with every kernel this CPU has); the
quantized kernels of the same library are tested in test_cpu_quant.py."""

import multiprocessing
import re
import stat
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import load_mlx, speech

import voxtral_mlx
from voxtral_mlx import cpu_kernels, mkl_bf16



@pytest.fixture(params=["AMX", "AVX-512"])
def kernel(request, monkeypatch) -> str:
    """Each row kernel the CPU has; for the AVX-512 one on a CPU with AMX, AMX is hidden."""
    if cpu_kernels.library() is None:
        pytest.skip(f"no kernel library: {cpu_kernels.reason}")
    if request.param == "AMX" and not cpu_kernels.amx():
        pytest.skip(f"the AMX row kernel is not available: {cpu_kernels.amx_reason}")
    if request.param == "AVX-512":
        monkeypatch.setattr(cpu_kernels, "amx", lambda: False)
    assert cpu_kernels.row_kernel() == request.param
    return request.param


def bf16_bits(x: np.ndarray) -> np.ndarray:
    return np.array(mx.array(x, mx.float32).astype(mx.bfloat16).view(mx.uint16))


def widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def call(kernel: str, x: np.ndarray, w: np.ndarray, threads: int, parts: int = 1, dot: bool | None = None):
    """The kernel's product on `threads` threads; without AMX and for x rounded to bfloat16,
    `dot_rows` (`dot`, by default where the CPU has AVX-512 BF16, as `rows_t`) or `wide_rows`."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    lib = cpu_kernels.library()
    args = [x.ctypes.data, w.ctypes.data, out.ctypes.data, x.shape[0], w.shape[0], x.shape[1], threads]
    if kernel == "AMX":
        scratch = np.empty(parts * x.size, np.uint16)
        used = lib.bf16_rows(*args, scratch.ctypes.data, parts)
    elif parts == 1 and (cpu_kernels.dot_bf16() if dot is None else dot):
        scratch = np.empty(x.size, np.uint16)
        used = lib.dot_rows(*args, scratch.ctypes.data)
    else:
        scratch = np.empty(x.size, np.float32)
        used = lib.wide_rows(*args, scratch.ctypes.data, parts)
    assert used == threads
    return out


@pytest.mark.parametrize("M,N,K", [(1, 32, 32), (3, 96, 64), (16, 64, 3072), (17, 320, 96), (32, 128, 1056)])
def test_products_are_float32_sums_of_bfloat16_terms(kernel, M, N, K):
    rng = np.random.default_rng(M * N + K)
    x = rng.normal(size=(M, K)).astype(np.float32)
    w = bf16_bits(rng.normal(size=(N, K)))
    got = cpu_kernels.rows_t(x, w)
    assert got.shape == (M, N) and got.dtype == np.float32
    xb = widen(bf16_bits(x))
    exact = xb @ widen(w).T
    bound = 1e-6 * np.sqrt(K) * (np.abs(xb) @ np.abs(widen(w)).T) + 1e-30
    assert np.all(np.abs(got - exact) <= 8 * bound)


def test_inputs_are_rounded_to_nearest_even_and_rows_land_in_place(kernel):
    # An identity weight returns bf16(x) itself: every row and column where it belongs.
    rng = np.random.default_rng(0)
    K = 64
    x = rng.normal(size=(20, K)).astype(np.float32)
    x[0, :8] = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-9, 0.0, -0.0, 3.5, 1e30], np.float32)
    eye = bf16_bits(np.eye(K))
    got = cpu_kernels.rows_t(x, eye)
    assert np.array_equal(got, widen(bf16_bits(x)).astype(np.float32))
    assert list(got[0, :4]) == [1.0, 1 + 2**-6, -1.0, 1.0]  # ties go to the even neighbour


def test_a_row_gets_the_same_bits_whatever_rows_and_threads_surround_it(kernel):
    rng = np.random.default_rng(1)
    K, N = 3072, 1024
    x = rng.normal(size=(32, K)).astype(np.float32)
    w = bf16_bits(rng.normal(size=(N, K)))
    dots = [False, True] if kernel == "AVX-512" and cpu_kernels.dot_bf16() else [None]
    for parts, dot in [(1, d) for d in dots] + [(3, None)]:
        alone = np.concatenate([call(kernel, x[i : i + 1], w, 1, parts, dot) for i in range(32)])
        for m in (2, 3, 4, 5, 6, 16, 17, 32):
            for threads in (1, 2, 3):
                assert np.array_equal(call(kernel, x[:m], w, threads, parts, dot), alone[:m]), (m, threads, parts)
        if dot is not False:
            assert np.array_equal(cpu_kernels.rows_t(x[5:9], w, parts)[2], alone[7])
        # Float32 sums of the bfloat16 products (or of x's own values' products, three parts).
        xb = x.astype(np.float64) if parts == 3 else widen(bf16_bits(x))
        exact = xb @ widen(w).T
        assert np.abs(alone - exact).max() < 2e-5 * np.abs(exact).max(), (parts, dot)


def test_the_avx512_kernel_gives_rows_their_bits_across_its_blocks_of_rows():
    # wide_rows takes x a block of 512 KB at a time: 8 rows of 16384 values, so 23 rows are
    # three blocks (8, 8, 7), each over every weight row.
    if cpu_kernels.library() is None:
        pytest.skip(f"no kernel library: {cpu_kernels.reason}")
    rng = np.random.default_rng(12)
    K, N = 16384, 64
    x = rng.normal(size=(23, K)).astype(np.float32)
    w = bf16_bits(rng.normal(size=(N, K)))
    alone = np.concatenate([call("AVX-512", x[i : i + 1], w, 1, 3) for i in range(23)])
    for m in (9, 16, 23):
        assert np.array_equal(call("AVX-512", x[:m], w, 2, 3), alone[:m]), m
    exact = x.astype(np.float64) @ widen(w).T
    assert np.abs(alone - exact).max() < 1e-5 * np.abs(exact).max()
    if cpu_kernels.dot_bf16():  # dot_rows holds x in bfloat16: blocks of 16 rows (16, 7)
        alone = np.concatenate([call("AVX-512", x[i : i + 1], w, 1, 1, True) for i in range(23)])
        for m in (9, 16, 17, 23):
            assert np.array_equal(call("AVX-512", x[:m], w, 2, 1, True), alone[:m]), m


def test_matmul_t_takes_the_kernel_for_few_rows_and_mkl_beyond(kernel, monkeypatch):
    rng = np.random.default_rng(2)
    w = mx.array(rng.normal(size=(64, 96)), mx.float32).astype(mx.bfloat16)
    bits = mkl_bf16.bits(w)
    calls = []
    real = cpu_kernels.rows_t
    monkeypatch.setattr(cpu_kernels, "rows_t", lambda x, w, *rest: (calls.append(x.shape), real(x, w, *rest))[1])
    for rows, through_kernel in ((1, True), (32, True), (33, False)):
        x = mx.array(rng.normal(size=(1, rows, 96)), mx.float32)
        got = np.array(mkl_bf16.matmul_t(x, bits), np.float64)
        exact = widen(bf16_bits(np.array(x)[0])) @ widen(bits).T
        assert got.shape == (1, rows, 64) and np.abs(got[0] - exact).max() < 1e-4
        assert (calls[-1:] == [(rows, 96)]) == through_kernel
    assert not cpu_kernels.fits(4, 48, 96) and not cpu_kernels.fits(4, 64, 80) and cpu_kernels.fits(4, 64, 96)
    for parts in (1, 3):  # no rows: nothing to multiply
        assert cpu_kernels.rows_t(np.zeros((0, 96), np.float32), bits, parts).shape == (0, 64)


def test_calls_from_several_threads_at_once(kernel):
    rng = np.random.default_rng(3)
    cases = [(rng.normal(size=(m, 256)).astype(np.float32), bf16_bits(rng.normal(size=(512, 256)))) for m in (1, 5, 9, 30)]
    expected = [cpu_kernels.rows_t(x, w) for x, w in cases]
    failures = []

    def worker(i):
        for _ in range(50):
            if not np.array_equal(cpu_kernels.rows_t(*cases[i]), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and failures == []


def _product_in_child(queue, eye):  # numpy only: MLX itself does not survive a fork
    queue.put(cpu_kernels.rows_t(np.ones((3, 64), np.float32), eye).sum())


def test_a_forked_child_starts_its_own_workers(kernel):
    eye = bf16_bits(np.eye(64))
    cpu_kernels.rows_t(np.ones((2, 64), np.float32), eye)  # the parent's workers exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_product_in_child, args=(queue, eye))
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == 3 * 64


def test_bfloat16_batch_gives_each_file_its_single_file_tokens(kernel, small_windows_dir):
    model = voxtral_mlx.load(small_windows_dir, dtype="bfloat16")
    clips = [speech("jfk")[:48000], speech("night1968_5s")[:64000], speech("jfk")[16000:40000]]
    single = [model.transcribe(c, speculate=0).tokens for c in clips]
    batched = model.transcribe(clips, batch_size=3)
    assert [r.tokens for r in batched] == single
    assert model.transcribe(clips[1], speculate=8).tokens == single[1]


# Building and refusing


def test_reasons_when_the_kernel_cannot_be_used(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert cpu_kernels._load() == (None, "VOXTRAL_MLX_CPU_KERNELS=off")
    monkeypatch.setenv(cpu_kernels.ENV, "sometimes")
    assert cpu_kernels._load()[1] == "VOXTRAL_MLX_CPU_KERNELS=sometimes is not auto or off"
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernels.sys, "platform", "linux")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"sse2", "avx2"})
    assert cpu_kernels._load() == (None, "the CPU lacks avx512f")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: set(cpu_kernels.CPU_FLAGS))
    monkeypatch.setattr(cpu_kernels, "compiler", lambda: None)
    assert cpu_kernels._load() == (None, "no C compiler (set CC, or install gcc or clang)")


@pytest.mark.skipif(cpu_kernels.library() is None, reason=f"no kernel library: {cpu_kernels.reason}")
def test_without_amx_the_avx512_kernels_multiply(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx512f", "amx_tile"})
    cpu_kernels.amx.cache_clear()
    cpu_kernels.packed_kernel.cache_clear()
    try:
        reason = "the CPU lacks amx_bf16, amx_int8, avx512_bf16, avx512bw"
        assert not cpu_kernels.amx() and cpu_kernels.amx_reason == reason
        assert cpu_kernels.row_kernel() == "AVX-512" and cpu_kernels.fits(1, 64, 64) and cpu_kernels.q_fits(8, 64, 128)
        assert not cpu_kernels.q_packed_fits(8, 64, 128) and cpu_kernels.packed_kernel() is None
        packed_reason = f"neither AMX nor AVX-512 VNNI ({reason}; the CPU lacks avx512_vnni, avx512bw)"
        assert cpu_kernels.packed_reason == packed_reason
        msg = f"the packed quantized kernel is not available: {packed_reason}"
        eye = bf16_bits(np.eye(64))
        assert np.array_equal(cpu_kernels.rows_t(np.full((1, 64), 1 + 2**-9, np.float32), eye, 3),
                              np.full((1, 64), 1 + 2**-9, np.float32))
        q, scales = np.zeros((16, 32), np.uint32), np.zeros((16, 2), np.float32)
        with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
            cpu_kernels.q_pack(q, scales, scales, 8, 64)
        packed = cpu_kernels.QPacked(np.zeros((1, 2048), np.uint8), *[np.zeros((1, 2, 16), np.float32)] * 2, 16, 8, 64)
        with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
            cpu_kernels.q_packed_t(np.ones((40, 128), np.float32), packed)
        assert cpu_kernels.q_rows_t(np.ones((40, 128), np.float32), q, scales, scales, 8, 64).shape == (40, 16)
    finally:
        cpu_kernels.amx.cache_clear()
        cpu_kernels.packed_kernel.cache_clear()


@pytest.mark.skipif(not mkl_bf16.available() or cpu_kernels.library() is None, reason="needs MKL and the kernels")
def test_without_amx_float32_products_of_many_rows_take_the_row_kernel_or_widened_blocks(monkeypatch):
    rng = np.random.default_rng(11)
    monkeypatch.setattr(cpu_kernels, "amx", lambda: False)
    calls = []
    real = cpu_kernels.bf16_widen
    monkeypatch.setattr(cpu_kernels, "bf16_widen", lambda w, out: (calls.append(w.shape[0]), real(w, out))[1])
    # Whole multiples of 32: wide_rows, whatever the rows. Else MKL over the weight widened
    # 20 rows at a time (WIDENED): 20, 20, 20, 20, 16.
    for rows, (N, K), widened in ((33, (96, 96), []), (300, (96, 96), []), (33, (96, 80), [20, 20, 20, 20, 16])):
        monkeypatch.setattr(cpu_kernels, "WIDENED", 20 * K)
        w = bf16_bits(rng.normal(size=(N, K)))
        calls.clear()
        x = rng.normal(size=(rows, K)).astype(np.float32)
        got = mkl_bf16.rows_t(x, w, parts=3)
        exact = x.astype(np.float64) @ widen(w).T  # x's own values: float32 products
        assert calls == widened and got.shape == (rows, N)
        assert np.abs(got - exact).max() < 1e-5 * np.abs(exact).max()
        if not widened:  # the row kernel's: each row's bits whatever rows are around it
            assert np.array_equal(got[-1:], mkl_bf16.rows_t(x[-1:], w, parts=3))
    # --dtype bfloat16 (x rounded to bfloat16): many rows through the row kernel too.
    w = bf16_bits(rng.normal(size=(96, 96)))
    x = rng.normal(size=(40, 96)).astype(np.float32)
    calls.clear()
    got = mkl_bf16.rows_t(x, w, parts=1)
    exact = widen(bf16_bits(x)) @ widen(w).T
    assert calls == [] and np.abs(got - exact).max() < 1e-5 * np.abs(exact).max()
    assert np.array_equal(got[-1:], mkl_bf16.rows_t(x[-1:], w, parts=1))
    odd = bf16_bits(rng.normal(size=(3, 21)))  # a row's last values past the whole vectors
    assert np.array_equal(cpu_kernels.bf16_widen(odd, np.empty(70, np.float32)), widen(odd).astype(np.float32))
    with pytest.raises(ValueError, match="^bf16_widen needs contiguous uint16 rows, got float32"):
        cpu_kernels.bf16_widen(np.ones((2, 24), np.float32), np.empty(48, np.float32))


def fake_compiler(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_failing_compiler_is_reported_and_nothing_is_cached(tmp_path, monkeypatch):
    cc = fake_compiler(tmp_path / "cc", 'if [ "$1" = --version ]; then echo fake 1; exit 0; fi\n'
                                        'echo "cpu_rows.c:1: error: unknown target" >&2; exit 1\n')
    monkeypatch.setenv("CC", cc)
    assert cpu_kernels.compiler() == cc
    with pytest.raises(RuntimeError, match="^cc could not build cpu_rows.c: cpu_rows.c:1: error: unknown target$"):
        cpu_kernels.build(cc, "int x;", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_build_is_cached_per_source_and_compiler(tmp_path, monkeypatch):
    log = tmp_path / "log"
    cc = fake_compiler(tmp_path / "cc", f'if [ "$1" = --version ]; then echo fake 1; exit 0; fi\necho built >> {log}\n'
                                        'for a; do out=$a; done; touch "$out"\n')
    first = cpu_kernels.build(cc, "int x;", tmp_path / "cache")
    assert cpu_kernels.build(cc, "int x;", tmp_path / "cache") == first and first.exists()
    other = cpu_kernels.build(cc, "int y;", tmp_path / "cache")
    assert other != first and log.read_text() == "built\nbuilt\n"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_kernels.cache_dir() == tmp_path / "xdg" / "voxtral-mlx"


def test_rows_t_refuses_what_it_cannot_multiply(kernel):
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="needs a contiguous uint16 weight with 64 columns"):
        cpu_kernels.rows_t(x, np.ones((32, 64), np.float32))
    with pytest.raises(ValueError, match="at most 32 rows and multiples of 32"):
        cpu_kernels.rows_t(np.ones((33, 64), np.float32), bf16_bits(np.eye(64)))
    if kernel == "AVX-512":  # wide_t: any rows, x in 1 or 3 parts, rounded only for whole shapes
        with pytest.raises(ValueError, match="^wide_t: rows of 64 values by a weight of shape \\(32, 48\\)$"):
            cpu_kernels.wide_t(np.ones((40, 64), np.float32), bf16_bits(np.ones((32, 48))))
        with pytest.raises(ValueError, match="^wide_t takes x in 1 or 3 parts, not 2$"):
            cpu_kernels.wide_t(np.ones((40, 64), np.float32), bf16_bits(np.eye(64)), parts=2)
        with pytest.raises(ValueError,
                           match="^wide_t rounds x to bfloat16 only for whole multiples of 32 \\(40 x 64\\)$"):
            cpu_kernels.wide_t(np.ones((40, 64), np.float32), bf16_bits(np.ones((40, 64))), parts=1)


# Attention and SwiGLU of several rows through numpy on the CPU (encoder.py)


@pytest.mark.parametrize("H,Hk,L,S,masked", [(4, 4, 7, 7, False), (4, 2, 5, 12, True), (8, 2, 3, 40, True)])
def test_numpy_attention_equals_mlx_attention(H, Hk, L, S, masked):
    from voxtral_mlx.encoder import numpy_attention

    rng = np.random.default_rng(H * L + S)
    q, k, v = (mx.array(rng.normal(size=shape), mx.float32) for shape in ((2, H, L, 16), (2, Hk, S, 16), (2, Hk, S, 16)))
    mask = None
    if masked:  # causal over the last L keys, a window of 6 positions
        pos, t = np.arange(S), np.arange(S - L, S)[:, None]
        mask = mx.array((pos <= t) & (pos > t - 6))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = numpy_attention(q, k, v, mask, 0.25)
    assert got.shape == expected.shape and got.dtype == mx.float32
    assert mx.abs(got - expected).max().item() < 1e-5
    half = numpy_attention(q.astype(mx.bfloat16), k.astype(mx.bfloat16), v.astype(mx.bfloat16), mask, 0.25)
    assert half.dtype == mx.bfloat16


def test_numpy_swiglu_equals_mlx_silu_product():
    from voxtral_mlx.encoder import numpy_swiglu

    gate = mx.array(np.concatenate([np.random.default_rng(0).normal(0, 4, 1000), [-1e4, -100, 0, 100, 1e4]]), mx.float32)
    up = mx.array(np.random.default_rng(1).normal(size=gate.size), mx.float32)
    expected = mx.sigmoid(gate) * gate * up
    got = numpy_swiglu(gate, up)
    assert mx.allclose(got, expected, rtol=1e-5, atol=1e-6).item()
    assert np.isfinite(np.array(got)).all()


def test_the_model_takes_the_numpy_paths_for_chunks_and_mlx_for_single_steps(tiny_dir, monkeypatch):
    from voxtral_mlx import encoder

    rows = []
    real_attention, real_swiglu = encoder.numpy_attention, encoder.numpy_swiglu
    monkeypatch.setattr(encoder, "numpy_attention", lambda q, *a: (rows.append(("attention", q.shape[2])), real_attention(q, *a))[1])
    monkeypatch.setattr(encoder, "numpy_swiglu", lambda g, u: (rows.append(("swiglu", g.shape[1])), real_swiglu(g, u))[1])
    model = load_mlx(tiny_dir)  # MLX's graphs (else `host` runs the encoder)
    tokens = model.transcribe(speech("jfk")[:32000]).tokens
    assert rows and all(n >= 2 for _, n in rows) and {kind for kind, _ in rows} == {"attention", "swiglu"}
    monkeypatch.setattr(encoder, "NUMPY_ROWS", 10**9)
    rows.clear()
    assert model.transcribe(speech("jfk")[:32000]).tokens == tokens and rows == []


@pytest.mark.skipif(cpu_kernels.library() is None, reason=f"no kernel library: {cpu_kernels.reason}")
@pytest.mark.parametrize("n", [1, 15, 16, 17, 4099, 300000])
def test_silu_mul_is_swiglu_to_float32_rounding(n):
    from voxtral_mlx import host

    rng = np.random.default_rng(n)
    g = rng.normal(0, 6, n).astype(np.float32)
    g[: min(n, 9)] = np.array([-1e4, -100, -87.5, -87, -20, 0, 1e-30, 20, 1e4], np.float32)[: min(n, 9)]
    u = rng.normal(size=n).astype(np.float32)
    with np.errstate(over="ignore"):
        want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    got = cpu_kernels.silu_mul(g, u)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    # The exponential's 2e-7, the product's and quotient's roundings: a few float32 ulps.
    assert np.all(np.abs(got - want) <= 6e-7 * np.abs(want) + 1e-30)  # (below -87.3, zeros)
    # In place (into g), on one thread or all, and the numpy path: the same values (the numpy
    # path to its own rounding).
    one = np.empty_like(g)
    cpu_kernels.library().silu_mul(g.ctypes.data, u.ctypes.data, one.ctypes.data, n, 1)
    assert np.array_equal(one, got)
    assert np.array_equal(host.silu_product(g.copy(), u, overwrite=True), got)
    with np.errstate(over="ignore"):
        numpy = g / (1 + np.exp(-g)) * u
    assert np.all(np.abs(got - numpy) <= 6e-7 * np.abs(want) + 1e-30)
    with pytest.raises(ValueError, match="one shape"):
        cpu_kernels.silu_mul(g, u[: n - 1] if n > 1 else np.zeros(2, np.float32))
