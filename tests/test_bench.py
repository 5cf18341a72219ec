"""The benchmark scripts: `bench.py` on a tiny checkpoint in every mode, and `compile.py`, each
recording what it says it does."""

import ctypes
import importlib.util
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import AUDIO

from voxtral_mlx import packs

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
CLIPS = [AUDIO / "jfk.wav", AUDIO / "night1968_5s.wav"]


COLD = hasattr(os, "posix_fadvise")


def resident(path: Path) -> int:
    """Pages of a file in the system's file cache (mincore over a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, np.uint8)
        pages = np.zeros(-(-m.size() // mmap.PAGESIZE), np.uint8)
        assert libc.mincore(view.ctypes.data, m.size(), pages.ctypes.data) == 0, ctypes.get_errno()
        del view
        return int((pages & 1).sum())


@pytest.mark.skipif(not COLD, reason="posix_fadvise is Linux's")
def test_cold_drops_a_models_weight_files_from_the_file_cache(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = tmp_path / "model"
    model.mkdir()
    weights, other = model / "model.safetensors", model / "tekken.json"
    monkeypatch.setenv(packs.ENV, str(tmp_path / "packed"))
    (tmp_path / "packed").mkdir()
    files = [weights, other, None, tmp_path / "packed" / "other.safetensors"]
    for i, file in enumerate(files):
        if file is None:  # the model's packed layers (`packs`), named for the files written above
            file = files[i] = packs.store_for(model, [weights]).path
        with open(file, "wb") as f:
            f.write(np.random.default_rng(0).bytes(4 << 20))
            os.fsync(f.fileno())
        file.read_bytes()
    kept = files[2]
    pages = (4 << 20) // mmap.PAGESIZE
    if resident(weights) < pages:
        pytest.skip("this file system does not keep the file in the cache")
    assert module.evict(str(model)) is True
    assert resident(weights) == resident(kept) == 0  # only the model's weights
    assert resident(other) == resident(kept.with_name("other.safetensors")) == pages
    assert module.evict(str(tmp_path / "missing")) is False
    assert module.evict("mistralai/Voxtral-Mini-4B-Realtime-2602") is False  # a repo id: nothing local


def bench(*args):
    env = dict(os.environ, VOXTRAL_MLX_STATES="off")
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=300)


def test_every_mode_runs_and_records_its_numbers(tiny_dir, tmp_path):
    out = tmp_path / "records.json"
    done = bench("--model", tiny_dir, "--audio", *CLIPS, "--modes", "parts,offline,stream,batch,speculate,sessions",
                 "--steps", 6, "--encoder-tokens", 4, "--speculate", "4,8", "--sessions", 3, "--json", out)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_mode = {}
    for r in records:
        by_mode.setdefault(r["mode"], []).append(r)
    assert set(by_mode) == {"parts", "offline", "stream", "sequential", "batch", "speculate", "sessions"}
    (parts,) = by_mode["parts"]
    assert 0 < parts["step_ms_p50"] <= parts["step_ms_p95"] and parts["encoder_ms_per_audio_s"] > 0
    assert parts["left_pad_positions"] == 31 and parts["prefill_positions"] == 8
    assert parts["left_pad_read"] is False  # no store of states: the left pad was computed
    assert {"cpu", "cores", "blas", "pages", "mlx"} <= set(parts["machine"])
    offline = {r["audio"]: r for r in by_mode["offline"]}
    stream = {r["audio"]: r for r in by_mode["stream"]}
    assert set(offline) == set(stream) == {c.name for c in CLIPS}
    for name in offline:  # one token per 80 ms either way
        assert offline[name]["tokens"] == stream[name]["tokens"] > 0
        assert stream[name]["latency_ms_p50"] <= stream[name]["latency_ms_p95"]
    (sequential,), (batch,) = by_mode["sequential"], by_mode["batch"]
    assert batch["same_tokens"] is True and batch["batch_size"] == 2
    assert batch["tokens"] == sequential["tokens"] == sum(r["tokens"] for r in offline.values())
    speculative = [r for r in by_mode["speculate"] if r["speculate"]]
    assert len(speculative) == 2 * 2 * len(CLIPS)  # K = 4 and 8, speech and silence, each clip
    assert all(r["same_tokens"] is True for r in speculative)
    assert all(r["pad_rate"] == 1.0 for r in by_mode["speculate"] if r["audio"].startswith("silence"))
    assert "| jfk.wav | voxtral-mlx offline |" in done.stdout
    assert "| jfk.wav + night1968_5s.wav | voxtral-mlx batch of 2 |" in done.stdout
    (live,) = by_mode["sessions"]  # three streams of the two clips, one turn of 320 ms apart
    assert live["same_tokens"] is True and live["sessions"] == 3 and live["turn_ms"] == 320
    jfk, night = offline["jfk.wav"]["tokens"], offline["night1968_5s.wav"]["tokens"]
    assert live["tokens"] == 2 * jfk + night and live["wall_s"] > 0 and live["one_by_one_wall_s"] > 0
    assert "| jfk.wav + night1968_5s.wav + jfk.wav | voxtral-mlx 3 live sessions fed together |" in done.stdout


def test_too_few_steps_are_refused(tiny_dir):
    done = bench("--model", tiny_dir, "--modes", "parts", "--steps", 4)
    assert done.returncode == 2
    assert "--steps takes more than 4 (the first 4 are not timed)" in done.stderr


def test_the_compile_benchmark_finds_compiled_graphs_equal_to_eager():
    script = BENCH.parent / "compile.py"
    done = subprocess.run([sys.executable, str(script), "--calls", "1", "--repeat", "1"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 10  # five cases, float32 and bfloat16
    assert all(r["equal"] is True and r["eager_ms"] > 0 and r["compiled_ms"] > 0 for r in records)
    on_cpu = records[0]["device"] == "CPU"  # where the model's own path is timed beside them
    assert all((r["host_ms"] is not None) == (on_cpu and "SwiGLU" in r["case"]) for r in records)


def test_several_models_run_apart_and_end_in_one_summary(tiny_dir, small_windows_dir, tmp_path):
    # A stand-in for the other engine's Python: the record voxmlx's run prints, whatever it is asked.
    other = tmp_path / "other-python"
    other.write_text('#!/bin/sh\necho \'{"load_s": 2.0, "wall_s": 30.0, "tokens": 5, "peak_rss_mb": 2048}\'\n')
    other.chmod(0o755)
    out = tmp_path / "records.json"
    done = bench("--model", tiny_dir, small_windows_dir, "--audio", *CLIPS, "--modes", "parts,offline,batch",
                 "--steps", 6, "--encoder-tokens", 4, "--compare", "voxmlx", "--compare-python", other, "--json", out,
                 *["--cold"] * COLD)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["cold"] == COLD for r in records)  # each model's files dropped before its process, voxmlx's too
    assert ("(--cold)" in done.stdout) == COLD
    assert [r["audio"] for r in records if r["mode"] == "voxmlx"] == [CLIPS[0].name]  # the first clip
    for model in (tiny_dir, small_windows_dir):
        mine = [r for r in records if r.get("model") == str(model)]
        assert sorted(r["mode"] for r in mine) == ["batch", "offline", "offline", "parts", "sequential"]
        (parts,) = [r for r in mine if r["mode"] == "parts"]
        assert parts["read_gbs"] > 0 and parts["bandwidth_gbs"] == 68.0
        # the step's weights at its p50: the floor's bytes in its time
        assert parts["step_gbs"] * parts["step_ms_p50"] == pytest.approx(parts["bandwidth_gbs"] * parts["step_floor_ms"])
        # each model in its own process: a load of its own, and the summary's row
        offline = next(r for r in mine if r["mode"] == "offline" and r["audio"] == CLIPS[0].name)
        batch = next(r for r in mine if r["mode"] == "batch")
        ratio = 32.0 / (offline["load_s"] + offline["left_pad_s"] + offline["wall_s"])
        (row,) = [line for line in done.stdout.splitlines() if line.startswith(f"| {model} |")]  # the parent's
        assert row.endswith(f" | {ratio:.1f}x |")
        assert f" | {batch['sequential_wall_s']:.1f} / {batch['wall_s']:.1f} ({batch['batch_speedup']:.2f}x) | " in row
    assert "| voxmlx (its defaults) | bfloat16 as stored, MLX's own products | 2.0 | 30.0 |" in done.stdout
    assert f"Clip: {CLIPS[0].name}." in done.stdout
