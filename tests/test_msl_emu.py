"""The Metal kernel emulator itself: SIMD operations, rounding, and the mistakes it must catch."""

import mlx.core as mx
import numpy as np
import pytest

import msl_emu


@pytest.fixture(autouse=True)
def clang():
    if msl_emu.find_clang() is None:
        pytest.skip("clang++-19 not found: apt install clang-19")


def run(source: str, inputs, out_shape, out_dtype=mx.float32, grid=(64, 1, 1), threadgroup=(64, 1, 1), template=None):
    kernel = msl_emu.metal_kernel("probe", [f"in{i}" for i in range(len(inputs))], ["out"], source)
    return kernel(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup, output_shapes=[out_shape],
                  output_dtypes=[out_dtype])[0]


def test_simd_operations_match_numpy():
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    source = """
        const uint i = thread_position_in_grid.x;
        const float v = in0[i];
        out[4 * i] = simd_sum(v);
        out[4 * i + 1] = simd_max(v);
        out[4 * i + 2] = simd_shuffle_down(v, 3);
        out[4 * i + 3] = simd_broadcast(v, 5);
    """
    out = np.array(run(source, [x], (64, 4)))
    for s in range(2):
        lanes = x[32 * s: 32 * s + 32]
        got = out[32 * s: 32 * s + 32]
        np.testing.assert_allclose(got[:, 0], lanes.sum(), rtol=1e-5)
        np.testing.assert_array_equal(got[:, 1], lanes.max())
        np.testing.assert_array_equal(got[:, 2], np.concatenate([lanes[3:], lanes[-3:]]))
        np.testing.assert_array_equal(got[:, 3], lanes[5])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_rounding_to_half_and_bfloat_matches_mlx(dtype):
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32) * 3
    x[:5] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504.0]  # ties to even, fp16 max
    out = run("out[thread_position_in_grid.x] = static_cast<T>(in0[thread_position_in_grid.x]);", [x], (64,), dtype,
              template=[("T", dtype)])
    assert mx.array_equal(out, mx.array(x).astype(dtype))


def test_barrier_in_divergent_control_flow_is_reported():
    source = """
        if (thread_index_in_threadgroup < 32) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        out[thread_position_in_grid.x] = in0[thread_position_in_grid.x];
    """
    with pytest.raises(msl_emu.EmulatorError, match="deadlock.*32 wait at threadgroup_barrier.*32 returned"):
        run(source, [np.zeros(64, np.float32)], (64,))


def test_simd_operation_on_part_of_a_simdgroup_is_reported():
    source = """
        float v = in0[thread_position_in_grid.x];
        if (thread_index_in_simdgroup < 16) {
            v = simd_sum(v);
        }
        out[thread_position_in_grid.x] = v;
    """
    with pytest.raises(msl_emu.EmulatorError, match="deadlock.*SIMD"):
        run(source, [np.zeros(64, np.float32)], (64,))


def test_unwritten_memory_reads_as_nan():
    source = """
        threadgroup float shared[64];
        const uint i = thread_index_in_threadgroup;
        if (i % 2 == 0) {
            shared[i] = in0[i];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (i < 48) {
            out[i] = shared[i];
        }
    """
    out = np.array(run(source, [np.ones(64, np.float32)], (64,)))
    assert (out[:48:2] == 1).all() and np.isnan(out[1:48:2]).all() and np.isnan(out[48:]).all()


def test_threadgroup_memory_is_fresh_in_every_threadgroup():
    """Each threadgroup sees its own threadgroup memory, NaN until written (not what an
    earlier threadgroup on the same worker left there)."""
    source = """
        threadgroup float shared[1];
        const uint g = threadgroup_position_in_grid.x;
        const float before = shared[0];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (thread_index_in_threadgroup == 0) {
            shared[0] = float(g);
            out[2 * g] = before;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (thread_index_in_threadgroup == 1) {
            out[2 * g + 1] = shared[0] + in0[0];
        }
    """
    out = np.array(run(source, [np.zeros(8, np.float32)], (16,), grid=(8 * 32, 1, 1), threadgroup=(32, 1, 1)))
    assert np.isnan(out[0::2]).all()
    np.testing.assert_array_equal(out[1::2], np.arange(8))


def test_signature_follows_mlx():
    """Inputs below 8 elements are `constant`, others `device`; shapes and strides only when
    the body names them; template arguments as MLX writes them."""
    kernel = msl_emu.metal_kernel("sig", ["small", "big"], ["out"], "out[0] = small[0] + big[big_shape[0] - 1];")
    params = kernel.signature([(mx.int32, 1, 5), (mx.float32, 2, 64)], [mx.float16])
    assert [(p.name, p.ctype) for p in params] == [
        ("small", "const constant int32_t*"), ("big", "const device float*"), ("big_shape", "const constant int*"),
        ("out", "device float16_t*")]
    program = kernel.program(params, [("T", mx.bfloat16), ("N", 3), ("flag", True)])
    assert "template <typename T, int N, bool flag>" in program
    assert "custom_kernel_sig<bfloat16_t, 3, 1>" in program
