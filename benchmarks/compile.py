"""MLX's `mx.compile` against eager graphs for the model's elementwise work, on the default device.

    python benchmarks/compile.py [--calls 50] [--repeat 5]

The model's products, attention, norms and RoPE are single MLX operations (matmuls, `mx.fast`
kernels) or, on the CPU, kernels of the library; what `mx.compile` could fuse is the glue
between them: SwiGLU (`silu(w1 x) * w3 x`; the model's `silu` is not `mlx.nn.silu`, which is
compiled: see `encoder.silu`), and a decoder layer's residual adds with the delay-scaled FFN
norm (`x + a`, `rms_norm(x) * scale`). This times each eager, compiled (shapeless, as the
model's shapes vary) and, on the CPU, through the path the model takes there (`host`), for a
decoder step (1 row of 9216 or 3072 values), a batch of four, and an offline encoder chunk
(376 x 5120), in float32 and bfloat16; checks that compiled and eager results are equal; prints
one JSON record per case, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import voxtral_mlx  # noqa: F401  first: it chooses the BLAS before MLX loads
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from voxtral_mlx import encoder  # noqa: E402


def swiglu(g, u):
    return encoder.silu(g) * u


def glue(x, a, w, scale):
    """A decoder layer's elementwise work around its attention and FFN products."""
    x = x + a
    return x, mx.fast.rms_norm(x, w, 1e-5) * scale


CASES = [  # (name, rows, width)
    ("decoder step, SwiGLU", 1, 9216), ("batch of four, SwiGLU", 4, 9216),
    ("encoder chunk, SwiGLU", 376, 5120), ("decoder step, residual + scaled norm", 1, 3072),
    ("batch of four, residual + scaled norm", 4, 3072),
]


def outputs(f, inputs) -> tuple:
    out = f(*inputs)
    return out if isinstance(out, tuple) else (out,)


def timed(f, args, calls: int, repeat: int) -> float:
    mx.eval(f(*args))
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            mx.eval(f(*args))
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    device = "GPU" if mx.default_device() == mx.gpu else "CPU"
    rng = np.random.default_rng(0)
    records = []
    for dtype in (mx.float32, mx.bfloat16):
        for name, rows, width in CASES:
            calls = max(2, args.calls * 64 // max(64, rows))
            arrays = [mx.array(rng.normal(0, 1, (rows, width)).astype(np.float32)).astype(dtype) for _ in range(2)]
            if "SwiGLU" in name:
                eager, inputs = swiglu, arrays
                host = encoder.numpy_swiglu if device == "CPU" else None
            else:
                weight = mx.array(rng.normal(1, 0.1, width).astype(np.float32)).astype(dtype)
                eager, inputs, host = glue, [*arrays, weight, weight], None
            compiled = mx.compile(eager, shapeless=True)
            same = all(np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
                       for a, b in zip(outputs(eager, inputs), outputs(compiled, inputs)))
            record = {"case": name, "rows": rows, "width": width, "dtype": str(dtype).rsplit(".", 1)[-1],
                      "device": device, "eager_ms": timed(eager, inputs, calls, args.repeat),
                      "compiled_ms": timed(compiled, inputs, calls, args.repeat), "equal": same,
                      "host_ms": None if host is None else timed(host, inputs, calls, args.repeat)}
            print(json.dumps(record), flush=True)
            records.append(record)
    print(f"\nmlx {mx.__version__} on the {device}\n")
    print("| case | dtype | eager | compiled | compiled / eager | the model's path on the CPU | equal |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        host = "-" if r["host_ms"] is None else f"{r['host_ms']:.3f} ms"
        print(f"| {r['case']} ({r['rows']} x {r['width']}) | {r['dtype']} | {r['eager_ms']:.3f} ms | "
              f"{r['compiled_ms']:.3f} ms | {r['compiled_ms'] / r['eager_ms']:.2f} | {host} | {r['equal']} |")


if __name__ == "__main__":
    main()
