"""Offline and streaming transcription speed, latency and memory.

    python benchmarks/bench.py --model DIR [--audio FILE ...] [--dtype float32] [--chunk-ms 80]

Prints one JSON record per run, then a table. Streaming feeds the clip in chunks as fast as
the engine takes them; a token's latency is the time from the call that delivered the last
sample it needs to the moment its text is returned, on top of the model's own delay
(`delay_ms` plus 2.5 ms of STFT look-ahead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import voxtral_mlx
from voxtral_mlx.weights import blas_backend

SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "ram_gb": round(mem_gb, 1) if mem_gb else None, "mlx": mx.__version__,
            "device": str(mx.default_device()), "blas": blas_backend()}


def peak_rss_mb() -> float:
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def offline(model, samples: np.ndarray, delay_ms) -> dict:
    start = time.perf_counter()
    result = model.transcribe(samples, delay_ms=delay_ms)
    wall = time.perf_counter() - start
    return {"mode": "offline", "wall_s": wall, "tokens": len(result.tokens),
            "rtf": result.duration / wall, "ms_per_token": 1000 * wall / len(result.tokens)}


def streaming(model, samples: np.ndarray, delay_ms, chunk_ms: float) -> dict:
    sr = model.sample_rate
    chunk = max(1, int(sr * chunk_ms / 1000))
    session = model.stream(delay_ms=delay_ms)
    latencies, first_text = [], None
    start = time.perf_counter()
    for i in range(0, samples.size, chunk):
        t0 = time.perf_counter()
        before = len(session.tokens)
        text = session.feed(samples[i : i + chunk])
        t1 = time.perf_counter()
        latencies += [t1 - t0] * (len(session.tokens) - before)
        if text.strip() and first_text is None:
            first_text = t1 - start
    t0 = time.perf_counter()
    session.finish()
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"mode": "stream", "chunk_ms": chunk_ms, "wall_s": wall, "tokens": len(session.tokens),
            "rtf": samples.size / sr / wall, "ms_per_token": 1000 * wall / len(session.tokens),
            "finish_s": time.perf_counter() - t0,
            "latency_ms_mean": float(lat.mean()), "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p95": float(np.percentile(lat, 95)),
            "model_delay_ms": session.delay_ms + 1000 * model.audio.look_ahead / sr,
            "first_text_s": first_text}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory or repo id")
    ap.add_argument("--audio", nargs="*", default=[str(SHARED_AUDIO / "jfk.wav")])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--delay-ms", type=int, default=None)
    ap.add_argument("--chunk-ms", type=float, default=80.0)
    ap.add_argument("--modes", default="offline,stream")
    ap.add_argument("--json", help="append the records to this file")
    args = ap.parse_args(argv)

    info = machine()
    start = time.perf_counter()
    model = voxtral_mlx.load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - start
    records = []
    for path in args.audio:
        samples = voxtral_mlx.load_audio(path)
        for mode in args.modes.split(","):
            mx.reset_peak_memory()
            rec = offline(model, samples, args.delay_ms) if mode == "offline" else \
                streaming(model, samples, args.delay_ms, args.chunk_ms)
            rec.update(audio=Path(path).name, audio_s=samples.size / model.sample_rate, load_s=load_s,
                       dtype=str(model.dtype).rsplit(".", 1)[-1], model=str(args.model),
                       peak_mlx_mb=mx.get_peak_memory() / 2**20, peak_rss_mb=peak_rss_mb(), machine=info)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    if args.json:
        with open(args.json, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    print(f"\n{info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB, mlx {info['mlx']} "
          f"({info['device']}, BLAS: {info['blas']}); load {load_s:.1f} s")
    print("| clip | mode | audio s | wall s | x real time | ms/token | latency p50/p95 ms | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        lat = f"{r['latency_ms_p50']:.0f} / {r['latency_ms_p95']:.0f}" if r["mode"] == "stream" else "-"
        print(f"| {r['audio']} | {r['mode']} | {r['audio_s']:.1f} | {r['wall_s']:.1f} | {r['rtf']:.2f} | "
              f"{r['ms_per_token']:.0f} | {lat} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
