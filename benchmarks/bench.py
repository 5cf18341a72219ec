"""Offline and streaming transcription speed, latency and memory.

    python benchmarks/bench.py --model DIR [DIR ...] [--audio FILE ...] [--dtype float32]
        [--chunk-ms 80] [--compare voxmlx --compare-python PY] [--json OUT]

Prints one JSON record per run, then tables. Several models run one after another, each in a
child process of its own (the other engine first), and end with one summary table: a row per
model, against the other engine end to end. Besides end-to-end runs (offline, and
streaming in `--chunk-ms` chunks as fast as the engine takes them), it times the parts: the
encoder (ms per second of audio), the prompt prefill, and decoder steps (double-buffered, as
in transcription), whose weight traffic it compares with the memory-bandwidth floor at the rated
`--bandwidth`, and as a speed with a plain read (numpy, the kernels' threads) measured just
before the steps: on a shared machine what the memory gives varies from hour to hour. A
streamed token's latency is the time from the call that delivered the last sample it needs to
the moment its text is returned, on top of the model's own delay (`delay_ms` + 2.5 ms).

`--compare voxmlx` runs the `voxmlx` package (PyPI) at its default settings on the same
checkpoint (the first model, which must be in the official layout) and the first clip, in a
child process (`--compare-python` names a Python that has it).

Offline and batch runs decode plainly (`speculate=0`): a random checkpoint emits pads about
as rarely as any other token, so the pads that `transcribe`'s default speculative decoding
guesses (where the CPU's row kernels multiply) would not come; the `speculate` mode measures
that default at the pad rates of speech and of silence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import voxtral_mlx  # first: it chooses the BLAS before MLX loads
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from voxtral_mlx import cpu_kernels, cpu_quant, encoder, mkl_bf16, packs  # noqa: E402
from voxtral_mlx.streaming import advance_together  # noqa: E402
from voxtral_mlx.weights import blas_backend  # noqa: E402

SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"
DEFAULT_BANDWIDTH_GBS = 68.0
WARM_STEPS = 4  # decoder steps of the parts mode left out of its times, while the pipeline fills
READ_ONLY = "--plain-read"  # the child's only argument: measure the read and print GB/s


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem_gb, 1),
            "mlx": mx.__version__, "device": "gpu" if mx.default_device() == mx.gpu else "cpu",
            "blas": blas_backend(), "pages": pages()}


def pages() -> str:
    """How the process's large buffers are paged: with THP in "madvise" mode (Debian's and
    Ubuntu's default), MLX's buffers get 2 MB pages only where glibc's hugetlb tunable is set."""
    if sys.platform != "linux":
        return "the system's"
    try:
        mode = next(w[1:-1] for w in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split()
                    if w.startswith("["))
    except (OSError, StopIteration):
        return "unknown"
    tunables = dict(item.partition("=")[::2] for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if item)
    if mode == "madvise" and tunables.get("glibc.malloc.hugetlb", "0") != "0":
        return "THP madvise, glibc.malloc.hugetlb=" + tunables["glibc.malloc.hugetlb"]
    return f"THP {mode}"


def read_gbs() -> float:
    """`plain_read_gbs` in a child process, whose buffer then counts in no peak memory of ours."""
    done = subprocess.run([sys.executable, __file__, READ_ONLY], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def plain_read_gbs(size: int = 1 << 30, passes: int = 7) -> float:
    """A plain read of `size` bytes, GB/s, the median of `passes`: as the memory serves a decoder
    step's weights. On the CPU split between the kernels' threads (numpy's reductions release the
    GIL); on a GPU one MLX reduction."""
    speeds = []
    if mx.default_device() == mx.gpu:
        data = mx.ones((size // 4,), mx.uint32)
        mx.eval(data)
        for _ in range(passes):
            start = time.perf_counter()
            mx.eval(mx.max(data))
            speeds.append(size / (time.perf_counter() - start) / 1e9)
        return float(np.median(speeds))
    parts = np.array_split(np.ones(size // 8, np.uint64), cpu_kernels.threads())
    for _ in range(passes):
        threads = [threading.Thread(target=np.max, args=(part,)) for part in parts]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        speeds.append(size / (time.perf_counter() - start) / 1e9)
    return float(np.median(speeds))


def peak_rss_mb() -> float:
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def evict(model: str) -> bool:
    """Drop a local model's weight files (and its packed layers kept on disk, `packs`) from the
    system's file cache (Linux), so that the next load reads them from the disk, as a first load
    after a reboot does; whether it could. (A virtual machine's host may still hold them in a
    cache of its own.)"""
    files = sorted(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
    if not files or not hasattr(os, "posix_fadvise"):
        return False
    store = packs.store_for(Path(model), files)
    files += [store.path] if store is not None and store.path.is_file() else []
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def quantization(model) -> str:
    bits = {m.bits for _, m in model.net.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    return "none" if not bits else "/".join(f"{b}-bit" for b in sorted(bits))


def decoder_bytes(model) -> int:
    """Weight bytes one decoder step reads: every decoder layer, the final norm and the tied head."""
    net = model.net
    layers = sum(v.nbytes for _, v in tree_flatten([layer.parameters() for layer in net.layers]))
    head = sum(v.nbytes for _, v in tree_flatten(net.embedding_module.tok_embeddings.parameters()))
    return layers + head + net.norm.weight.nbytes


def components(model, delay_ms, steps: int = 48, tokens: int = 64, context: int = 0) -> dict:
    """Encoder per audio second (on `tokens` tokens of audio), prefill, and decoder steps, each timed on its own.
    `context`: the steps run as if that many positions preceded them (the decoder caches are
    filled with random keys and values after the prefill, up to the window): a long stream's steps."""
    net, audio = model.net, model.audio
    session = model.stream(delay_ms=delay_ms)
    rng = np.random.default_rng(0)
    mel = session._mel(mx.array(rng.normal(0, 0.1, tokens * audio.samples_per_token + 240).astype(np.float32)))
    caches = net.make_cache()
    mx.eval(net.encode(mel[: 8 * 8], caches))  # warm up
    start = time.perf_counter()
    emb = net.encode(mel, caches)
    mx.eval(emb)
    encoder_s = time.perf_counter() - start
    seconds = tokens * audio.samples_per_token / audio.sampling_rate

    caches = net.make_cache()
    L = len(session.prompt)
    embeds = mx.concatenate([emb] * (-(-(L + steps) // tokens)))[: L + steps]
    # warm up: a GPU backend compiles its kernels on the first call (3 s on CUDA)
    mx.eval(net.decode(embeds[:L], mx.array(session.prompt), net.make_cache(), session.scales))
    # The positions that hear only the left pad (a model's first session computes them, the
    # others copy their state), then the rest of the prompt, which every session computes.
    n = audio.pad_only_tokens
    start = time.perf_counter()
    mx.eval(net.decode(embeds[:n], mx.array(session.prompt[:n]), caches, session.scales),
            [c.state for c in caches.decoder])
    left_pad_s = time.perf_counter() - start
    start = time.perf_counter()
    logits = net.decode(embeds[n:L], mx.array(session.prompt[n:]), caches, session.scales)
    token = mx.argmax(logits)
    mx.eval(token, [c.state for c in caches.decoder])
    prefill_s = time.perf_counter() - start
    for c in caches.decoder if context else []:
        B, H, _, D = c.keys.shape
        filled = min(L + context, c.capacity)
        c.keys, c.values = (mx.random.normal((B, H, filled, D), c.keys.dtype) for _ in range(2))
        c.offset = L + context
        mx.eval(c.keys, c.values)

    times = []
    mx.async_eval(token)
    last = time.perf_counter()
    for p in range(L, L + steps):
        nxt = mx.argmax(net.decode(embeds[p : p + 1], token.reshape(1), caches, session.scales))
        mx.async_eval(nxt)
        token.item()
        now = time.perf_counter()
        times.append(now - last)
        last, token = now, nxt
    token.item()
    step_ms = np.array(times[WARM_STEPS:]) * 1000  # after the pipeline fills
    return {"encoder_ms_per_audio_s": 1000 * encoder_s / seconds, "prefill_ms": 1000 * prefill_s,
            "prefill_positions": L - n, "left_pad_prefill_ms": 1000 * left_pad_s, "left_pad_positions": n,
            "step_context": context, "step_ms_mean": float(step_ms.mean()),
            "step_ms_p50": float(np.percentile(step_ms, 50)), "step_ms_p95": float(np.percentile(step_ms, 95))}


def offline(model, samples: np.ndarray, delay_ms) -> dict:
    start = time.perf_counter()
    result = model.transcribe(samples, delay_ms=delay_ms, speculate=0)
    wall = time.perf_counter() - start
    return {"mode": "offline", "wall_s": wall, "tokens": len(result.tokens), "rtf": result.duration / wall}


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
    session.finish()
    wall = time.perf_counter() - start
    lat = np.array(latencies or [0.0]) * 1000
    return {"mode": "stream", "chunk_ms": chunk_ms, "wall_s": wall, "tokens": len(session.tokens),
            "rtf": samples.size / sr / wall, "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p95": float(np.percentile(lat, 95)),
            "model_delay_ms": session.delay_ms + 1000 * model.audio.look_ahead / sr, "first_text_s": first_text}


def batch(model, paths: list[str], delay_ms) -> list[dict]:
    """The clips transcribed one after another, then as one batch: wall times and throughput ratio."""
    clips = [voxtral_mlx.load_audio(p) for p in paths]
    seconds = sum(c.size for c in clips) / model.sample_rate
    name = " + ".join(Path(p).name for p in paths)
    mx.reset_peak_memory()
    start = time.perf_counter()
    alone = [model.transcribe(c, delay_ms=delay_ms, speculate=0) for c in clips]
    sequential_s = time.perf_counter() - start
    sequential_mb = mx.get_peak_memory() / 2**20
    mx.reset_peak_memory()
    start = time.perf_counter()
    together = model.transcribe(clips, delay_ms=delay_ms, batch_size=len(clips))
    batch_s = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in together)
    return [{"mode": "sequential", "wall_s": sequential_s, "tokens": tokens, "rtf": seconds / sequential_s,
             "audio": name, "audio_s": seconds, "peak_mlx_mb": sequential_mb},
            {"mode": "batch", "batch_size": len(clips), "wall_s": batch_s, "tokens": tokens, "rtf": seconds / batch_s,
             "audio": name, "audio_s": seconds, "peak_mlx_mb": mx.get_peak_memory() / 2**20,
             "sequential_wall_s": sequential_s, "batch_speedup": sequential_s / batch_s,
             "same_tokens": all(a.tokens == b.tokens for a, b in zip(alone, together))}]


def sessions(model, paths: list[str], delay_ms, n: int, turn_ms: float = 320.0) -> dict:
    """n live sessions fed in turns of `turn_ms` of audio, as the server feeds its streams:
    session i takes clip i (round the list), starts i turns after the first and ends (its
    padding decoded) in the turn after its last audio. Round robin, a session at a time, then
    each turn of all the sessions together (`advance_together`, as the server's engine)."""
    clips = [voxtral_mlx.load_audio(paths[i % len(paths)]) for i in range(n)]
    turn = int(model.sample_rate * turn_ms / 1000)
    seconds = sum(c.size for c in clips) / model.sample_rate
    ends = [i + -(-c.size // turn) for i, c in enumerate(clips)]  # the turn of each session's end

    def run(together: bool) -> tuple[float, list]:
        streams = [model.stream(delay_ms=delay_ms, speculate=model.default_speculate) for _ in clips]
        start = time.perf_counter()
        for t in range(max(ends) + 1):
            due = [(s, ("feed", c[(t - i) * turn : (t - i + 1) * turn]) if t < ends[i] else ("finish",))
                   for i, (s, c) in enumerate(zip(streams, clips)) if i <= t <= ends[i]]
            if together:
                advance_together([s for s, _ in due], [op for _, op in due])
            else:
                for s, op in due:
                    getattr(s, op[0])(*op[1:])
        return time.perf_counter() - start, [s.tokens for s in streams]

    apart_s, apart = run(False)
    together_s, tokens = run(True)
    return {"mode": "sessions", "sessions": n, "turn_ms": turn_ms, "wall_s": together_s,
            "tokens": sum(len(t) for t in tokens), "rtf": seconds / together_s, "audio_s": seconds,
            "audio": " + ".join(Path(paths[i % len(paths)]).name for i in range(n)), "one_by_one_wall_s": apart_s,
            "sessions_speedup": apart_s / together_s, "same_tokens": tokens == apart}


class PadBias:
    """Adds `bias` to the [STREAMING_PAD] logit of every decoder call, and counts the calls.

    A random checkpoint's head has no reason to prefer pads; this one reproduces the pad rate of
    real speech, which is what speculative decoding feeds on. It can also record, per token, by
    how much the pad logit trails the best other one (`gaps`), to calibrate the bias.
    """

    def __init__(self, model):
        self.net, self.pad, self.vocab = model.net, model.tokenizer.pad, model.net.args.decoder.vocab_size
        self.decode = self.net.decode
        self.one_hot = mx.arange(self.vocab) == self.pad
        self.bias, self.calls, self.positions, self.gaps = 0.0, 0, 0, []
        self.record = False
        self.net.decode = self

    def __call__(self, audio, tokens, caches, scales, every: bool = False):
        logits = self.decode(audio, tokens, caches, scales, every)
        self.calls += 1
        self.positions += tokens.shape[-1]
        if self.bias:
            logits = logits + self.bias * self.one_hot.astype(logits.dtype)
        if self.record:
            others = mx.where(self.one_hot, -mx.inf, logits.astype(mx.float32))
            self.gaps.append(mx.max(others, axis=-1) - logits[..., self.pad].astype(mx.float32))
        return logits

    def calibrate(self, model, samples, delay_ms, rate: float, tolerance: float = 0.07, runs: int = 4):
        """Set the bias so that `rate` of the tokens are pads, within `tolerance` (or the closest
        of `runs` greedy runs): a first guess from the logit gaps of an unbiased run, then bisection
        (the fed-back pads change what follows, so the guess alone is off)."""
        self.bias, self.record, self.gaps = 0.0, True, []
        model.transcribe(samples, delay_ms=delay_ms, speculate=0)
        self.record = False
        gaps = np.concatenate([np.array(g).reshape(-1) for g in self.gaps])
        if rate >= 1:
            self.bias = float(gaps.max()) + 1.0
            return
        lo, hi = float(gaps.min()) - 1.0, float(gaps.max()) + 1.0
        bias, best = float(np.quantile(gaps, rate)), None
        for _ in range(runs):
            self.bias = bias
            tokens = model.transcribe(samples, delay_ms=delay_ms, speculate=0).tokens
            got = sum(t == self.pad for t in tokens) / len(tokens)
            if best is None or abs(got - rate) < abs(best[1] - rate):
                best = (bias, got)
            if abs(got - rate) <= tolerance:
                break
            lo, hi = (lo, bias) if got > rate else (bias, hi)
            bias = (lo + hi) / 2
        self.bias = best[0]

    def remove(self):
        del self.net.decode


def speculation(model, samples: np.ndarray, name: str, delay_ms, ks: list[int], rate: float) -> list[dict]:
    """Greedy against speculative pad decoding with a head biased to `rate` pads: wall time,
    decoder passes per audio second and the speedup, with the tokens checked equal."""
    bias = PadBias(model)
    try:
        bias.calibrate(model, samples, delay_ms, rate)
        seconds = samples.size / model.sample_rate
        records, greedy = [], None
        for k in [0] + ks:
            bias.calls = bias.positions = 0
            start = time.perf_counter()
            result = model.transcribe(samples, delay_ms=delay_ms, speculate=k)
            wall = time.perf_counter() - start
            pads = sum(t == model.tokenizer.pad for t in result.tokens) / len(result.tokens)
            rec = {"mode": "speculate", "speculate": k, "audio": name, "audio_s": seconds, "wall_s": wall,
                   "rtf": seconds / wall, "tokens": len(result.tokens), "pad_rate": pads, "pad_bias": bias.bias,
                   "target_pad_rate": rate, "decoder_passes": bias.calls, "passes_per_audio_s": bias.calls / seconds,
                   "positions_computed": bias.positions}
            if greedy is None:
                greedy = (result.tokens, wall)
            else:
                rec.update(same_tokens=result.tokens == greedy[0], speedup=greedy[1] / wall)
            records.append(rec)
        return records
    finally:
        bias.remove()


VOXMLX_RUN = """
import json, resource, sys, time
t0 = time.perf_counter()
import mlx.core as mx
from voxmlx import load_model, _build_prompt_tokens
from voxmlx.generate import generate
model, sp, config = load_model(sys.argv[1])
load_s = time.perf_counter() - t0
prompt, n_delay = _build_prompt_tokens(sp)
t1 = time.perf_counter()
tokens = generate(model, sys.argv[2], prompt, n_delay_tokens=n_delay, eos_token_id=sp.eos_id)
wall = time.perf_counter() - t1
print(json.dumps({"load_s": load_s, "wall_s": wall, "tokens": len(tokens),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def voxmlx(python: str, model: str, audio: str, seconds: float) -> dict:
    """voxmlx's own load and generate (bf16 as stored, stops at the first end-of-sequence)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VOXTRAL_MLX_BLAS")}
    proc = subprocess.run([python, "-c", VOXMLX_RUN, model, audio], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"voxmlx failed:\n{proc.stderr[-2000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec.update(mode="voxmlx", rtf=seconds / rec["wall_s"])
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, nargs="+",
                    help="model directories or repo ids; several run one after another, each in its own process")
    ap.add_argument("--audio", nargs="*", default=[str(SHARED_AUDIO / "night1968_5s.wav")])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--delay-ms", type=int, default=None)
    ap.add_argument("--chunk-ms", type=float, default=80.0)
    ap.add_argument("--modes", default="parts,offline,stream",
                    help="any of parts, offline, stream, batch (all the clips one by one, then as one batch), "
                         "speculate (greedy against speculative pad decoding on each clip and on as much silence), "
                         "sessions (--sessions live streams fed in 320 ms turns and ended, one by one, then "
                         "together)")
    ap.add_argument("--sessions", type=int, default=4, help="live streams of the sessions mode")
    ap.add_argument("--speculate", default="4,8", help="positions per pass to try in the speculate mode")
    ap.add_argument("--pad-rate", type=float, default=0.55, help="pad rate on speech for the speculate mode")
    ap.add_argument("--steps", type=int, default=48, help="decoder steps timed in the parts mode")
    ap.add_argument("--encoder-tokens", type=int, default=64, help="tokens of audio encoded in the parts mode")
    ap.add_argument("--context", type=int, default=0,
                    help="parts mode: time the decoder steps after this many positions (8192: a stream past 11 minutes)")
    ap.add_argument("--mlx-attention", action="store_true",
                    help="decoder steps attend with MLX's attention, not the CPU kernel (to compare)")
    ap.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH_GBS, help="rated memory bandwidth, GB/s")
    ap.add_argument("--compare", choices=["voxmlx"], help="also run this engine on the first clip")
    ap.add_argument("--compare-python", default=sys.executable, help="the Python that has it installed")
    ap.add_argument("--cold", action="store_true",
                    help="drop each model's weight files from the system's file cache before its process loads "
                         "it (the other engine's too; Linux): end to end then includes reading them from disk")
    ap.add_argument("--json", help="append the records to this file")
    ap.add_argument("--no-summary", action="store_true", help="leave out the summary table")
    args = ap.parse_args(argv)
    if args.steps <= WARM_STEPS or args.encoder_tokens < 1:
        ap.error(f"--steps takes more than {WARM_STEPS} (the first {WARM_STEPS} are not timed) and "
                 f"--encoder-tokens at least 1")
    if args.mlx_attention:
        encoder.through_kernel = lambda *a: False

    info = machine()
    # The other engine first, in its own process, so that the two models never share the memory.
    others = [compare(args, args.audio[0], info)] if args.compare == "voxmlx" and args.audio else []
    if len(args.model) == 1:
        records = measure(args, args.model[0], info, others)
        print_table(records, info)
    else:
        records = others + [rec for model in args.model for rec in measure_apart(argv, model)]
    if args.json:
        with open(args.json, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    if not args.no_summary:
        print_summary(records, info)


def compare(args, path: str, info: dict) -> dict:
    seconds = voxtral_mlx.load_audio(path).size / 16000
    cold = args.cold and evict(args.model[0])
    rec = voxmlx(args.compare_python, str(args.model[0]), path, seconds)
    rec.update(cold=cold, audio=Path(path).name, audio_s=seconds,
               machine=dict(info, blas="the mlx-cpu wheel's, as voxmlx leaves it"))
    print(json.dumps(rec), flush=True)
    return rec


def measure_apart(argv, model: str) -> list[dict]:
    """One model's runs in a child process of its own (its memory and peak RSS its own), printing as it goes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in argv:  # the same options but the models, the other engine and the records file
        if skip and not arg.startswith("--"):
            continue
        skip = arg.split("=", 1)[0] in ("--model", "--compare", "--compare-python", "--json")
        if not skip:
            kept.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        done = subprocess.run([sys.executable, __file__, "--model", model, "--json", str(out), "--no-summary", *kept])
        if done.returncode != 0:
            raise SystemExit(f"bench.py on {model} failed (exit {done.returncode})")
        return [json.loads(line) for line in out.read_text().splitlines()]


def measure(args, model_path: str, info: dict, others: list[dict]) -> list[dict]:
    cold = args.cold and evict(model_path)
    start = time.perf_counter()
    model = voxtral_mlx.load(model_path, dtype=args.dtype)
    load_s = time.perf_counter() - start
    # A model's first session computes the state of the tokens that hear only the left pad, which
    # later sessions copy: once per model and delay, timed here (with one token of audio) apart.
    # A later process reads it from disk (`states`; VOXTRAL_MLX_STATES=off times the computation).
    start = time.perf_counter()
    model.stream(delay_ms=args.delay_ms).feed(np.zeros(model.audio.samples_per_token, np.float32))
    left_pad_s = time.perf_counter() - start
    dtype = mkl_bf16.describe(model.net) or cpu_quant.describe(model.net) or str(model.dtype).rsplit(".", 1)[-1]
    common = {"model": str(model_path), "dtype": dtype, "quantization": quantization(model), "load_s": load_s,
              "cold": cold, "left_pad_s": left_pad_s, "left_pad_read": model.net.snapshots.read > 0, "machine": info}
    records = []
    modes = args.modes.split(",")
    if "parts" in modes:
        measured = read_gbs()
        rec = components(model, args.delay_ms, args.steps, args.encoder_tokens, args.context)
        floor_ms = decoder_bytes(model) / (args.bandwidth * 1e9) * 1000
        rec.update(mode="parts", step_floor_ms=floor_ms, step_vs_floor=rec["step_ms_p50"] / floor_ms,
                   bandwidth_gbs=args.bandwidth, step_gbs=decoder_bytes(model) / rec["step_ms_p50"] / 1e6,
                   read_gbs=measured, peak_rss_mb=peak_rss_mb(), **common)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    for path in args.audio:
        samples = voxtral_mlx.load_audio(path)
        seconds = samples.size / model.sample_rate
        for mode in [m for m in modes if m in ("offline", "stream")]:
            mx.reset_peak_memory()
            rec = offline(model, samples, args.delay_ms) if mode == "offline" else \
                streaming(model, samples, args.delay_ms, args.chunk_ms)
            rec.update(audio=Path(path).name, audio_s=seconds, peak_mlx_mb=mx.get_peak_memory() / 2**20,
                       peak_rss_mb=peak_rss_mb(), **common)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    if "speculate" in modes:
        ks = [int(k) for k in args.speculate.split(",")]
        for path in args.audio:
            samples = voxtral_mlx.load_audio(path)
            clips = [(Path(path).name, samples, args.pad_rate), (f"silence ({Path(path).name})", 0 * samples, 1.0)]
            for name, clip, rate in clips:
                for rec in speculation(model, clip, name, args.delay_ms, ks, rate):
                    rec.update(peak_rss_mb=peak_rss_mb(), **common)
                    print(json.dumps(rec), flush=True)
                    records.append(rec)
    if "batch" in modes:
        for rec in batch(model, args.audio, args.delay_ms):
            rec.update(peak_rss_mb=peak_rss_mb(), **common)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    if "sessions" in modes:
        rec = sessions(model, args.audio, args.delay_ms, args.sessions)
        rec.update(peak_rss_mb=peak_rss_mb(), **common)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    return others + records


def print_table(records, info):
    print(f"\n{info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB, mlx {info['mlx']} on the "
          f"{info['device'].upper()}, BLAS: {info['blas']}, pages: {info.get('pages', 'unknown')}")
    for r in records:
        if r["mode"] == "parts":
            after = f" after {r['step_context']} positions" if r.get("step_context") else ""
            how = " (read from disk)" if r.get("left_pad_read") else ""
            print(f"\n{r['dtype']}, quantization {r['quantization']}, load {r['load_s']:.1f} s, first session's "
                  f"left pad {r['left_pad_s']:.1f} s{how}: encoder {r['encoder_ms_per_audio_s']:.0f} ms per audio second, "
                  f"prefill of {r['left_pad_positions']} + {r['prefill_positions']} positions "
                  f"{r['left_pad_prefill_ms']:.0f} + {r['prefill_ms']:.0f} ms, decoder step{after} {r['step_ms_mean']:.0f} / "
                  f"{r['step_ms_p50']:.0f} / {r['step_ms_p95']:.0f} ms (mean / p50 / p95), "
                  f"{r['step_vs_floor']:.1f}x the {r['step_floor_ms']:.0f} ms floor at {r['bandwidth_gbs']:.0f} GB/s; "
                  f"its weights read at {r['step_gbs']:.0f} GB/s, a plain read at {r['read_gbs']:.0f} GB/s")
    rows = [r for r in records if r["mode"] not in ("parts", "speculate")]
    if rows:
        print("\n| clip | engine | audio s | wall s | x real time | latency p50/p95 ms | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        engine = "voxmlx (its defaults)" if r["mode"] == "voxmlx" else f"voxtral-mlx {r['mode']}"
        lat = f"{r['latency_ms_p50']:.0f} / {r['latency_ms_p95']:.0f}" if r["mode"] == "stream" else "-"
        extra = f" (+{r['load_s']:.0f} s load)" if r["mode"] == "voxmlx" else ""
        if r["mode"] == "batch":
            engine += f" of {r['batch_size']}"
            extra = f" ({r['batch_speedup']:.2f}x the sequential throughput)"
        if r["mode"] == "sessions":
            engine = f"voxtral-mlx {r['sessions']} live sessions fed together"
            extra = (f" ({r['sessions_speedup']:.2f}x one by one" + ("" if r["same_tokens"] else ", TOKENS DIFFER")
                     + ")")
        print(f"| {r['audio']} | {engine} | {r['audio_s']:.1f} | {r['wall_s']:.1f}{extra} | {r['rtf']:.2f} | {lat} | "
              f"{r['peak_rss_mb']:.0f} |")
    rows = [r for r in records if r["mode"] == "speculate"]
    if rows:
        print("\n| clip | pad rate | speculate | wall s | decoder passes per audio s | positions computed | speedup |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = "" if r["speculate"] == 0 else f"{r['speedup']:.2f}x" + ("" if r["same_tokens"] else " (TOKENS DIFFER)")
        print(f"| {r['audio']} | {r['pad_rate']:.0%} | {r['speculate'] or 'off'} | {r['wall_s']:.1f} | "
              f"{r['passes_per_audio_s']:.1f} | {r['positions_computed']} | {same or '-'} |")


def print_summary(records, info):
    """A row per model: its parts, the first clip offline and streamed, the batch, and end to end
    (the load, the first session's left pad and the first clip offline) against the other engine's
    (its load and the clip)."""
    models = [r for r in records if r["mode"] == "parts" or r["mode"] == "offline"]
    keys = list(dict.fromkeys((r["model"], r["dtype"]) for r in models))
    clips = [r["audio"] for r in records if r["mode"] in ("offline", "stream", "voxmlx")]
    if not keys:
        return
    clip = clips[0] if clips else None
    other = next((r for r in records if r["mode"] == "voxmlx" and r["audio"] == clip), None)
    print(f"\nSummary. {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB, mlx {info['mlx']} on the "
          f"{info['device'].upper()}." + (f" Clip: {clip}." if clip else "")
          + (" Each model's weight files dropped from the file cache before its process (--cold)."
             if any(r.get("cold") for r in records) else ""))
    print("\n| model | weights / products | load s | offline s | streaming s; latency p50 / p95 ms | "
          "decoder step mean / p50 / p95 ms | step / floor at the rated bandwidth | step's weights read at / a plain read | "
          "encoder ms per audio s | clips one by one / batch s | peak RSS GB | end to end against voxmlx (load, left pad, clip) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def find(key, mode, audio=None):
        return next((r for r in records if (r.get("model"), r.get("dtype")) == key and r["mode"] == mode
                     and (audio is None or r.get("audio") == audio)), None)

    for key in keys:
        rows = [r for r in records if (r.get("model"), r.get("dtype")) == key]
        parts, off, st, bt = find(key, "parts"), find(key, "offline", clip), find(key, "stream", clip), find(key, "batch")
        cells = [key[0], f"{key[1]}, quantization {rows[0]['quantization']}", f"{rows[0]['load_s']:.1f}"]
        cells.append(f"{off['wall_s']:.1f}" if off else "-")
        cells.append(f"{st['wall_s']:.1f}; {st['latency_ms_p50']:.0f} / {st['latency_ms_p95']:.0f}" if st else "-")
        if parts:
            cells += [f"{parts['step_ms_mean']:.0f} / {parts['step_ms_p50']:.0f} / {parts['step_ms_p95']:.0f}",
                      f"{parts['step_vs_floor']:.1f}x of {parts['step_floor_ms']:.0f} ms ({parts['bandwidth_gbs']:.0f} GB/s)",
                      f"{parts['step_gbs']:.0f} / {parts['read_gbs']:.0f} GB/s",
                      f"{parts['encoder_ms_per_audio_s']:.0f}"]
        else:
            cells += ["-"] * 4
        cells.append(f"{bt['sequential_wall_s']:.1f} / {bt['wall_s']:.1f} ({bt['batch_speedup']:.2f}x)" if bt else "-")
        cells.append(f"{max(r['peak_rss_mb'] for r in rows) / 1024:.1f}")
        cells.append(f"{(other['load_s'] + other['wall_s']) / (off['load_s'] + off['left_pad_s'] + off['wall_s']):.1f}x"
                     if other and off else "-")
        print("| " + " | ".join(cells) + " |")
    if other:
        print(f"| voxmlx (its defaults) | bfloat16 as stored, MLX's own products | {other['load_s']:.1f} | "
              f"{other['wall_s']:.1f} | - | - | - | - | - | - | {other['peak_rss_mb'] / 1024:.1f} | 1.0x |")


if __name__ == "__main__":
    if sys.argv[1:] == [READ_ONLY]:
        print(plain_read_gbs())
    else:
        main()
