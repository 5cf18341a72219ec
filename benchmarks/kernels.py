"""Ring attention: the Metal kernels against the MLX reference, on Apple silicon.

    python benchmarks/kernels.py [--calls 20] [--repeat 7]

Times `RingAttentionKernels` (with the block count it picks, and in one pass where that
differs) against `ring_attention_reference` in bfloat16 for the decoder's shapes (B=1,
32 query heads over 8 kv heads of 128, window 8192, rings of up to 8192 slots) and the
encoder's (32 heads of 64, window 750), for 1, 4, 8 and 16 queries. Prints one JSON record
per case, then a table and the `KERNEL_WINS` entries the measurements support (copy them
into src/voxtral_mlx/kernels.py). Without Metal it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import voxtral_mlx  # noqa: F401  first: it chooses the BLAS before MLX loads
import mlx.core as mx  # noqa: E402

from voxtral_mlx.kernels import RingAttentionKernels, metal_ready, ring_attention_reference  # noqa: E402

QUERIES = (1, 4, 8, 16)
DECODER = {"Hq": 32, "Hk": 8, "D": 128, "window": 8192, "spare": 16}
ENCODER = {"Hq": 32, "Hk": 32, "D": 64, "window": 750, "spare": 16}


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "mlx": mx.__version__}
    try:
        device = mx.metal.device_info()
        info.update(gpu=device.get("architecture"), memory_gb=round(device.get("memory_size", 0) / 2**30, 1))
    except (AttributeError, RuntimeError):
        pass
    return info


def cases():
    """(model, ring state, slots) for the decoder before and after its ring fills, and the
    encoder's full ring."""
    d = DECODER
    capacity = d["window"] + d["spare"]
    for slots in (1024, 4096):
        yield "decoder", d, {"last": slots - 1, "capacity": capacity, "window": d["window"]}, slots
    yield "decoder", d, {"last": 5 * capacity + 7, "capacity": capacity, "window": d["window"]}, capacity
    e = ENCODER
    capacity = e["window"] + e["spare"]
    yield "encoder", e, {"last": 40 * capacity + 3, "capacity": capacity, "window": e["window"]}, capacity


def seconds_per_call(calls: int, repeat: int, fn, *args, **kwargs) -> float:
    """Median over `repeat` runs of `calls` independent calls evaluated together."""
    mx.eval(fn(*args, **kwargs))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval([fn(*args, **kwargs) for _ in range(calls)])
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed run")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case (the median counts)")
    args = parser.parse_args(argv)
    if not metal_ready():
        print("Metal is not available here (or the GPU is not MLX's default device): nothing to measure.")
        return 0

    kernels = RingAttentionKernels()
    info = machine()
    rows = []
    for model, shape, state, slots in cases():
        for n in QUERIES:
            q = mx.random.normal((1, shape["Hq"], n, shape["D"])).astype(mx.bfloat16)
            keys, values = (mx.random.normal((1, shape["Hk"], slots, shape["D"])).astype(mx.bfloat16) for _ in range(2))
            call = {**state, "scale": shape["D"] ** -0.5}
            blocks = kernels.blocks(n, slots, state["last"], state["capacity"], state["window"])
            ref = ring_attention_reference(q, keys, values, **call)
            error = mx.abs(kernels(q, keys, values, **call).astype(mx.float32) - ref.astype(mx.float32)).max().item()
            timing = (args.calls, args.repeat)
            t_ref = seconds_per_call(*timing, ring_attention_reference, q, keys, values, **call)
            t_kernel = seconds_per_call(*timing, kernels, q, keys, values, **call)
            t_one = t_kernel if blocks == 1 else seconds_per_call(*timing, kernels, q, keys, values, blocks=1, **call)
            record = {"bench": "ring_attention", "model": model, "head_dim": shape["D"], "n": n, "slots": slots,
                      "blocks": blocks,
                      "reference_ms": round(t_ref * 1e3, 4), "kernel_ms": round(t_kernel * 1e3, 4),
                      "one_pass_ms": round(t_one * 1e3, 4), "speedup": round(t_ref / t_kernel, 3),
                      "max_abs_error": error, "dtype": "bfloat16", "machine": info}
            print(json.dumps(record), flush=True)
            rows.append(record)

    print(f"\nMachine: {info}\n")
    print("| model | n | slots | blocks | reference ms | kernel ms | one pass ms | speedup | max error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['n']} | {r['slots']} | {r['blocks']} | {r['reference_ms']:.3f} | "
              f"{r['kernel_ms']:.3f} | {r['one_pass_ms']:.3f} | {r['speedup']:.2f} | {r['max_abs_error']:.2g} |")
    print("\nKERNEL_WINS for src/voxtral_mlx/kernels.py (the kernel 5% faster everywhere in each region):")
    print(f"    {kernel_wins(rows)!r}")
    return 0


def kernel_wins(rows: list[dict]) -> tuple[tuple[int, int, int], ...]:
    """Entries (head dim, at most n queries, at least S slots) whose whole measured region won:
    for each measured (head dim, n), the fewest slots from which every case with at most n
    queries and at least that many slots was 5% faster with the kernel."""
    entries = set()
    for r in rows:
        d, n = r["head_dim"], r["n"]
        for least in sorted({x["slots"] for x in rows if x["head_dim"] == d}):
            region = [x for x in rows if x["head_dim"] == d and x["n"] <= n and x["slots"] >= least]
            if region and all(x["kernel_ms"] < 0.95 * x["reference_ms"] for x in region):
                entries.add((d, n, least))
                break
    # keep the entries no other entry contains
    return tuple(sorted(e for e in entries
                        if not any(o != e and o[0] == e[0] and o[1] >= e[1] and o[2] <= e[2] for o in entries)))


if __name__ == "__main__":
    sys.exit(main())
