"""`voxtral-mlx convert`: official -> converted -> loaded round trips, quantization, the output
directory and its errors, and the command line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import checkpoint, forced_logits, load_mlx, speech, synthetic
from layouts import E, P, write_transformers

import voxtral_mlx
from voxtral_mlx.convert import convert
from voxtral_mlx.weights import WeightsError

SCRIPT = Path(sys.executable).parent / "voxtral-mlx"
# Quantization is compared on a fixture whose attention is not saturated (the default qk_scale
# of 4 makes the random encoder chaotic: 8-bit weights move its output by 12%) and whose
# embedding (std 0.5) lets the tokens vary with the audio.
QUANT = dict(qk_scale=2.0, embed_std=0.5)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`converted(src, **options)`: the conversion of a checkpoint, written once per module."""
    root = tmp_path_factory.mktemp("converted")
    done = {}

    def make(src, **options):
        key = (str(src), tuple(sorted(options.items())))
        if key not in done:
            done[key] = convert(src, root / f"out{len(done)}", **options).path
        return done[key]

    return make


@pytest.fixture(scope="module")
def quant_dir(ckpt_root):
    return checkpoint(ckpt_root, **QUANT)


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.net.parameters()))


def assert_same_parameters(got, want, atol=0.0):
    got, want = params(got), params(want)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        np.testing.assert_allclose(np.array(got[name]), np.array(w), rtol=0, atol=atol, err_msg=name)


def compare(reference, model, audio) -> dict:
    """Teacher-forced comparison on the reference's own tokens: relative RMS logit error, the share
    of positions with the same argmax, and the reference's top-2 margins (in logit std units) where
    the argmax differs."""
    tokens = reference.transcribe(audio).tokens
    want, got = forced_logits(reference, audio, tokens), forced_logits(model, audio, tokens)
    centered = want - want.mean(axis=1, keepdims=True)
    top2 = np.sort(want, axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0]) / want.std(axis=1).mean()
    flipped = want.argmax(axis=1) != got.argmax(axis=1)
    return {"error": float(np.sqrt(((got - want) ** 2).mean() / (centered ** 2).mean())),
            "same": float(1 - flipped.mean()), "flip_margins": margins[flipped], "distinct": len(set(tokens))}


CLIPS = {"synthetic": lambda: synthetic(4.0), "jfk": lambda: speech("jfk")[: 6 * 16000]}


# Float round trips.

def test_float32_round_trip_is_exact(tiny_dir, converted):
    model = load_mlx(converted(tiny_dir, dtype="float32"))
    assert_same_parameters(model, load_mlx(tiny_dir))
    for clip in CLIPS.values():
        audio = clip()
        assert model.transcribe(audio).tokens == load_mlx(tiny_dir).transcribe(audio).tokens


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 0.0), ("float16", 2.0 ** -25)])
def test_half_precision_round_trip(tiny_dir, converted, dtype, atol):
    """The checkpoint holds bfloat16 values: a bfloat16 copy is bit-exact, and float16 holds them
    too except below 2^-14, its subnormal range, spaced 2^-24 (error at most half of that)."""
    out = converted(tiny_dir, dtype=dtype)
    stored = mx.load(str(out / "model.safetensors"))
    assert {w.dtype for w in stored.values()} == {getattr(mx, dtype)}
    model = load_mlx(out)
    assert_same_parameters(model, load_mlx(tiny_dir), atol=atol)
    for clip in CLIPS.values():
        audio = clip()
        assert model.transcribe(audio).tokens == load_mlx(tiny_dir).transcribe(audio).tokens


def test_bfloat16_of_float32_weights(tmp_path, quant_dir, converted):
    """Weights bfloat16 cannot hold (float32 with 1e-3 relative noise) are rounded to 8 significant
    bits: logits move by under 1% RMS, and teacher-forced tokens change only at near-ties."""
    source = tmp_path / "f32"
    convert(converted(quant_dir, dtype="float32"), source, dtype="float32")
    stored = mx.load(str(source / "model.safetensors"))
    rng = np.random.default_rng(0)
    noisy = {name: w * mx.array(1 + 1e-3 * rng.standard_normal(w.shape), mx.float32)
             for name, w in sorted(stored.items())}
    mx.save_safetensors(str(source / "model.safetensors"), noisy)
    f32 = load_mlx(source)
    bf16 = load_mlx(convert(source, tmp_path / "bf16", dtype="bfloat16").path)
    assert any(not np.array_equal(np.array(w), np.array(w.astype(mx.bfloat16).astype(mx.float32)))
               for w in params(f32).values())
    for clip in CLIPS.values():
        result = compare(f32, bf16, clip())
        assert result["error"] < 0.01
        assert result["same"] >= 0.95 and np.all(result["flip_margins"] < 0.25)


# Quantization.

@pytest.mark.parametrize("dtype,max_error,min_same,max_flip_margin", [
    ("float32", 0.03, 0.95, 0.15),
    ("bfloat16", 0.1, 0.9, 0.3),
])
def test_8bit_changes_only_near_ties(quant_dir, converted, dtype, max_error, min_same, max_flip_margin):
    """Why not the exact tokens: in a random tiny network some positions have a top-2 logit gap
    of under 1% of the logit spread (trained models separate their tokens; random ones do not),
    while 8-bit weights move logits by about 2% RMS (20% at the extreme). A position whose gap is
    below that may flip, and free-running, one flip changes every later input. So each position
    is compared on its own (teacher forcing): the logit error is bounded, every clear decision
    keeps its token, and nearly all positions do.

    Scales and biases in bfloat16 (the default dtype) round the group offsets to 8 significant
    bits, which about doubles the error of 8-bit weights (measured 0.045-0.064 RMS, against
    0.020-0.025 with float32 or float16 scales)."""
    reference = load_mlx(quant_dir)
    model = load_mlx(converted(quant_dir, q_bits=8, dtype=dtype))
    for clip in CLIPS.values():
        result = compare(reference, model, clip())
        assert result["distinct"] >= 5  # the tokens follow the audio: the comparison can fail
        assert result["error"] < max_error
        assert result["same"] >= min_same and np.all(result["flip_margins"] < max_flip_margin)


@pytest.mark.parametrize("group_size", [32, 64])
def test_4bit_logit_error(quant_dir, converted, group_size):
    """4-bit: relative RMS logit error under 0.6 (measured 0.31-0.47 on this fixture; 0.05 at 8
    bits, 0.09 at 6, with the default bfloat16 scales), ordered by the bits. Random weights
    quantize worse than trained ones; on the real model group-wise 4-bit is reported lossless."""
    reference = load_mlx(quant_dir)
    audio = CLIPS["jfk"]()
    errors = {bits: compare(reference, voxtral_mlx.load(converted(quant_dir, q_bits=bits, q_group_size=group_size),
                                                        dtype="float32"), audio)["error"]
              for bits in (4, 6, 8)}
    assert errors[4] < 0.6
    assert errors[8] < errors[6] < errors[4]


def intended_layers(group_size: int) -> set[str]:
    """The linear layers and embedding of the tiny fixture whose input width divides the group."""
    width = {"attention.wq": 64, "attention.wk": 64, "attention.wv": 64, "attention.wo": 64,
             "feed_forward.w1": 64, "feed_forward.w3": 64, "feed_forward.w2": 128}
    layers = {f"{E}transformer.layers.{i}.{m}": w for i in range(2) for m, w in width.items()}
    layers.update({f"layers.{i}.{m}": w for i in range(2) for m, w in width.items()})
    layers.update({P + "audio_language_projection.0": 256, P + "audio_language_projection.2": 64,
                   P + "tok_embeddings": 64})
    return {name for name, w in layers.items() if w % group_size == 0}


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (6, 128)])
def test_quantized_layers_are_the_intended_ones(tiny_dir, converted, bits, group_size):
    out = converted(tiny_dir, q_bits=bits, q_group_size=group_size)
    model = load_mlx(out)
    modules = dict(tree_flatten(model.net.leaf_modules(), is_leaf=nn.Module.is_module))
    quantized = {path for path, m in modules.items() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert quantized == intended_layers(group_size)
    assert all((modules[p].bits, modules[p].group_size) == (bits, group_size) for p in quantized)
    # Norms, the conv stem and the delay conditioning stay float.
    assert isinstance(modules["layers.0.ada_rms_norm_t_cond.0"], nn.Linear)
    assert isinstance(modules[E + "conv_layers.0.conv"], nn.Conv1d)
    stored = mx.load(str(out / "model.safetensors"))
    assert {n.rsplit(".", 1)[0] for n in stored if n.endswith(".scales")} == quantized
    assert all(stored[n].dtype == mx.uint32 for n in stored if n.rsplit(".", 1)[0] in quantized and n.endswith(".weight"))
    assert all(w.dtype == mx.bfloat16 for n, w in stored.items() if not n.endswith(".weight") or
               n.rsplit(".", 1)[0] not in quantized)


def test_size_and_bits_per_weight(tiny_dir, tmp_path):
    result = convert(tiny_dir, tmp_path / "q4", q_bits=4, q_group_size=32)
    stored = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    float_model = load_mlx(tiny_dir)
    assert result.parameters == sum(w.size for w in params(float_model).values())
    assert result.nbytes == sum(w.nbytes for w in stored.values())
    assert result.file_bytes == (tmp_path / "q4" / "model.safetensors").stat().st_size > result.nbytes
    quantized = intended_layers(32)
    q_params = sum(params(float_model)[f"{p}.weight"].size for p in quantized)
    # 4 bits per quantized weight plus a bfloat16 scale and bias per 32; 16 bits for the rest.
    bits = q_params * (4 + 2 * 16 / 32) + (result.parameters - q_params) * 16
    assert result.bits_per_weight == pytest.approx(bits / result.parameters)
    assert result.quantized and set(result.quantized) == quantized


def test_config_json(tiny_dir, converted):
    out = converted(tiny_dir, q_bits=8, q_group_size=32, dtype="float16")
    config = json.loads((out / "config.json").read_text())
    model = load_mlx(tiny_dir)
    assert config["format"] == "voxtral-mlx" and config["format_version"] == 1
    assert config["quantization"] == {"bits": 8, "group_size": 32, "mode": "affine"}
    assert config["dtype"] == "float16" and config["converted_from"] == "official"
    assert config["model"]["decoder"]["dim"] == 64 and config["model"]["encoder"]["sliding_window"] == 750
    assert config["audio"]["transcription_delay_ms"] == 480 and config["audio"]["n_left_pad_tokens"] == 32
    converted_model = load_mlx(out)
    assert converted_model.net.args == model.net.args and converted_model.audio == model.audio
    assert (out / "tekken.json").read_bytes() == (tiny_dir / "tekken.json").read_bytes()
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors", "tekken.json"]


def test_shards_and_index(tiny_dir, tmp_path):
    result = convert(tiny_dir, tmp_path / "out", dtype="float32", max_shard_bytes=300_000)
    out = tmp_path / "out"
    assert len(result.files) == 5 and result.files[0] == "model-00001-of-00005.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == result.files
    assert index["metadata"]["total_size"] == result.nbytes
    for file in result.files:
        shard = mx.load(str(out / file))
        assert sum(w.nbytes for w in shard.values()) <= 300_000 or len(shard) == 1  # a bigger tensor gets its own
    model = load_mlx(out)
    assert_same_parameters(model, load_mlx(tiny_dir))
    audio = synthetic(3.0)
    assert model.transcribe(audio).tokens == load_mlx(tiny_dir).transcribe(audio).tokens


def test_reconverting_a_quantized_model(tiny_dir, converted):
    """Same quantization: the packed weights are copied bit for bit. Another one (or none): the
    stored weights are dequantized first."""
    q4 = converted(tiny_dir, q_bits=4)
    again = converted(q4, q_bits=4)
    a, b = mx.load(str(q4 / "model.safetensors")), mx.load(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    dequantized = load_mlx(converted(q4, dtype="float32"))
    quantized = load_mlx(q4)
    modules = dict(tree_flatten(quantized.net.leaf_modules(), is_leaf=nn.Module.is_module))
    for path, m in modules.items():
        if isinstance(m, nn.QuantizedLinear):  # stored as written (the CPU kernels may store them their way)
            s, b = (a[f"{path}.{name}"].astype(mx.float32) for name in ("scales", "biases"))
            want = mx.dequantize(a[f"{path}.weight"], s, b, m.group_size, m.bits)
            assert mx.array_equal(params(dequantized)[f"{path}.weight"], want).item(), path
    audio = synthetic(3.0)
    result = compare(quantized, dequantized, audio)
    assert result["error"] < 1e-4 and result["same"] == 1.0


def test_converting_a_transformers_checkpoint(ckpt_root, tmp_path):
    src = checkpoint(ckpt_root, cond_dim=32)
    hf = write_transformers(src, tmp_path / "hf")
    result = convert(hf, tmp_path / "out", dtype="float32")
    assert result.source_layout == "transformers"
    assert_same_parameters(load_mlx(tmp_path / "out"), load_mlx(src))


# The output directory and errors.

def test_existing_output_is_refused(tiny_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'out'} already exists; choose another "
                                                        "directory, or replace it with --force")):
        convert(tiny_dir, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_force_replaces_a_converted_model(tiny_dir, tmp_path):
    convert(tiny_dir, tmp_path / "out", dtype="float32", max_shard_bytes=300_000)
    result = convert(tiny_dir, tmp_path / "out", q_bits=8, force=True)
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "tekken.json"]
    assert result.bits == 8 and json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 8
    assert [f.name for f in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("what", ["official model", "other files", "file"])
def test_force_leaves_other_things_alone(tiny_dir, tmp_path, what):
    out = tmp_path / "out"
    if what == "official model":
        out = tiny_dir
    elif what == "other files":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    else:
        out.write_text("keep")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    refused = "left alone|: not a model written by voxtral-mlx convert; --force replaces only"
    with pytest.raises(FileExistsError, match=refused):
        convert(tiny_dir, out, force=True)
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before


@pytest.mark.parametrize("options,message", [
    ({"q_bits": 5}, "q_bits 5 is not supported; use 4, 6 or 8"),
    ({"q_bits": 2}, "q_bits 2 is not supported; use 4, 6 or 8"),
    ({"q_bits": 4, "q_group_size": 16}, "q_group_size 16 is not supported; use 32, 64 or 128"),
    ({"q_bits": 4.0}, "q_bits 4.0 is not supported; use 4, 6 or 8"),
    ({"q_bits": True}, "q_bits True is not supported; use 4, 6 or 8"),
    ({"q_bits": 4, "q_group_size": 64.0}, "q_group_size 64.0 is not supported; use 32, 64 or 128"),
    ({"dtype": "int8"}, "dtype 'int8' is not supported; use float32, bfloat16 or float16"),
])
def test_bad_options(tiny_dir, tmp_path, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(tiny_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_a_failed_conversion_leaves_nothing(tiny_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    file = src / "consolidated.safetensors"
    os.truncate(file, file.stat().st_size - 1)
    with pytest.raises(WeightsError, match="truncated|not a readable safetensors file"):
        convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_output_that_appears_meanwhile_is_left_alone(tiny_dir, tmp_path, monkeypatch):
    conversion = sys.modules["voxtral_mlx.convert"]  # the package's `convert` is the function
    out, write = tmp_path / "out", conversion._write_shards

    def someone_else_writes_there(*args):
        out.mkdir()
        (out / "notes.txt").write_text("keep")
        return write(*args)

    monkeypatch.setattr(conversion, "_write_shards", someone_else_writes_there)
    with pytest.raises(FileExistsError, match=re.escape(f"{out} already exists")):
        convert(tiny_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "notes.txt").read_text() == "keep"


def test_replacing_keeps_one_whole_model_at_every_moment(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(tiny_dir, out, dtype="float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = Path.rename

    def interrupted(self, target):
        if self.name.startswith(".out.converting-"):  # the new model, into the old one's place
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_dir, out, q_bits=8, force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_what_killed_conversions_left_is_cleared(tiny_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    half = tmp_path / f".out.converting-{dead.pid}"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    convert(tiny_dir, tmp_path / "old", dtype="float32")
    (tmp_path / "old").rename(tmp_path / f".out.replaced-{dead.pid}")  # killed between its two renames
    alive = tmp_path / f".out.converting-{os.getppid()}"  # a conversion still running: left alone
    alive.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):  # the old model is back, and kept
        convert(tiny_dir, out)
    assert not half.exists() and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert alive.exists()
    convert(tiny_dir, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]


# Command line.

def run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="100", NO_COLOR="1")
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_cli_convert(tiny_dir, tmp_path):
    proc = run("convert", tiny_dir, tmp_path / "q4", "--q-bits", "4", "--q-group-size", "32")
    assert proc.returncode == 0 and proc.stderr == ""
    result = convert(tiny_dir, tmp_path / "again", q_bits=4, q_group_size=32)
    assert re.fullmatch(
        rf"converted {re.escape(str(tiny_dir))} \(official layout\) to {re.escape(str(tmp_path / 'q4'))}: 4-bit, "
        rf"group size 32, on 31 layers \(scales and other weights bfloat16\); 0\.\d\d MB in 1 file, "
        rf"{result.bits_per_weight:.2f} bits per weight, {result.parameters:,} parameters, \d+\.\d s\n", proc.stdout)
    audio = synthetic(3.0)
    assert (load_mlx(tmp_path / "q4").transcribe(audio).tokens
            == load_mlx(tmp_path / "again").transcribe(audio).tokens)


@pytest.mark.parametrize("args,message", [
    (["--q-bits", "5"], "--q-bits 5 is not supported; use 4, 6 or 8"),
    (["--q-bits", "4", "--q-group-size", "100"], "--q-group-size 100 is not supported; use 32, 64 or 128"),
    (["--dtype", "fp8"], "dtype 'fp8' is not supported; use float32, bfloat16 or float16"),
])
def test_cli_bad_options(tiny_dir, tmp_path, args, message):
    proc = run("convert", tiny_dir, tmp_path / "out", *args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"voxtral-mlx: error: {message}\n")


def test_cli_group_size_needs_bits(tiny_dir, tmp_path):
    proc = run("convert", tiny_dir, tmp_path / "out", "--q-group-size", "32")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "voxtral-mlx: error: --q-group-size applies to quantized models: add --q-bits 4, 6 or 8\n"
    assert not (tmp_path / "out").exists()


def test_cli_refuses_existing_output(tiny_dir, tmp_path):
    (tmp_path / "out").mkdir()
    proc = run("convert", tiny_dir, tmp_path / "out")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (f"voxtral-mlx: error: {tmp_path / 'out'} already exists; choose another directory, "
                           "or replace it with --force\n")
    assert run("convert", tiny_dir, tmp_path / "out", "--force").returncode == 0


def test_cli_unknown_source(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run("convert", tmp_path / "empty", tmp_path / "out")
    assert proc.returncode == 1 and proc.stderr.startswith(
        f"voxtral-mlx: error: {tmp_path / 'empty'} is not a Voxtral Realtime model directory: it holds no files")
