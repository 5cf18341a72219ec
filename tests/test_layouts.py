"""Every supported layout loads strictly and runs the same network as the official one; a
directory in no supported layout is a clear error."""

import json
import os
import re
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import checkpoint, load_mlx, load_model, speech
from layouts import (E, P, mlx_audio_quantized, official, permute_for_rope, voxmlx_quantized, write_mlx,
                     write_transformers)

import voxtral_mlx
from voxtral_mlx import cpu_quant, mkl_bf16
from voxtral_mlx.config import ConfigError
from voxtral_mlx.convert import convert
from voxtral_mlx.weights import ModelNotFoundError, WeightsError, find_checkpoint, read_weights

SUPPORTED = ("params.json + consolidated.safetensors + tekken.json (official), or config.json + model.safetensors "
             "+ tekken.json (voxtral-mlx, Hugging Face transformers, voxmlx, mlx-audio)")


@pytest.fixture(scope="module")
def src(ckpt_root):
    """Varied tokens, and the ada-norm width transformers hard-codes (32)."""
    return checkpoint(ckpt_root, cond_dim=32, embed_std=0.5, qk_scale=2.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def audio():
    return speech("jfk")[: 5 * 16000]


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.net.parameters()))


def assert_same_network(model, reference):
    got, want = params(model), params(reference)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert mx.array_equal(got[name], w).item(), name


def quantized_reference(src, predicate, quantization):
    """The official checkpoint, with the layers a layout quantizes quantized in memory."""
    model = load_mlx(src)
    names = {n for n, w in official(src).items() if predicate(n, w, quantization["group_size"])}
    nn.quantize(model.net, quantization["group_size"], quantization["bits"],
                class_predicate=lambda path, _: f"{path}.weight" in names)
    return model


def quantized_layers(model) -> set[str]:
    modules = tree_flatten(model.net.leaf_modules(), is_leaf=nn.Module.is_module)
    return {p for p, m in modules if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


# Hugging Face transformers.

@pytest.mark.parametrize("version", [4, 5])
def test_transformers_layout(src, root, audio, version):
    path = write_transformers(src, root / f"hf{version}", version=version)
    assert find_checkpoint(path).layout == "transformers"
    model = voxtral_mlx.load(path, dtype="float32")
    if mkl_bf16.float32_available():  # multiplied in their files' mapping, but those reordered at load
        mapped = {p for p, m in model.net.named_modules() if getattr(m, "_mapped", False)}
        assert {"layers.0.attention.wv", "layers.1.feed_forward.w2", P + "tok_embeddings"} <= mapped
        assert not mapped & {"layers.0.attention.wq", "layers.1.attention.wk"}
    # The query/key rows are back in the checkpoint's interleaved order: the very same tensors.
    assert_same_network(model, load_model(src))
    tokens = model.transcribe(audio).tokens
    assert tokens == load_model(src).transcribe(audio).tokens and len(set(tokens)) > 3


def test_transformers_permutation_is_not_trivial(src, root):
    path = write_transformers(src, root / "hf-check", version=4)
    stored = {**mx.load(str(path / "model-00001-of-00002.safetensors")),
              **mx.load(str(path / "model-00002-of-00002.safetensors"))}
    for hf, ours, heads in [("language_model.model.layers.0.self_attn.q_proj.weight", "layers.0.attention.wq.weight", 4),
                            ("language_model.model.layers.1.self_attn.k_proj.weight", "layers.1.attention.wk.weight", 2),
                            ("audio_tower.layers.0.self_attn.q_proj.bias", E + "transformer.layers.0.attention.wq.bias", 4)]:
        w = np.array(official(src)[ours])
        assert not np.array_equal(np.array(stored[hf].astype(mx.float32)), w)
        np.testing.assert_array_equal(np.array(stored[hf].astype(mx.float32)), permute_for_rope(w, heads))


def test_transformers_ada_norm_width_comes_from_transformers(ckpt_root, root):
    """transformers builds the ada-norm bottleneck 32 wide; a checkpoint with another width is caught."""
    path = write_transformers(checkpoint(ckpt_root), root / "hf-cond8")
    message = ("^" + re.escape("model.safetensors.index.json does not match config.json: ") + ".*"
               + re.escape("ada_rms_norm_t_cond.0.weight has shape [8, 64], but config.json implies [32, 64]"))
    with pytest.raises(WeightsError, match=message):
        voxtral_mlx.load(path)


# The community MLX layouts.

@pytest.mark.parametrize("layout", ["voxmlx", "mlx-audio"])
def test_mlx_layouts(src, root, audio, layout):
    path = write_mlx(src, root / layout, layout)
    assert find_checkpoint(path).layout == layout
    model = voxtral_mlx.load(path, dtype="float32")
    assert_same_network(model, load_model(src))
    assert model.transcribe(audio).tokens == load_model(src).transcribe(audio).tokens


@pytest.mark.parametrize("layout,bits,group_size", [("voxmlx", 4, 64), ("voxmlx", 8, 32), ("mlx-audio", 4, 32),
                                                    ("mlx-audio", 6, 64)])
def test_quantized_mlx_layouts(src, root, audio, layout, bits, group_size):
    """Quantized as each tool does it: the same layers end up quantized, with the same bits, and the
    tokens are those of the official weights quantized in memory the same way."""
    quantization = {"group_size": group_size, "bits": bits}
    path = write_mlx(src, root / f"{layout}-q{bits}-{group_size}", layout, quantization)
    model = voxtral_mlx.load(path, dtype="float32")
    predicate = voxmlx_quantized if layout == "voxmlx" else mlx_audio_quantized
    reference = quantized_reference(src, predicate, quantization)
    assert quantized_layers(model) == quantized_layers(reference) != set()
    if layout == "voxmlx":
        assert P + "tok_embeddings" in quantized_layers(model)
    else:
        assert P + "tok_embeddings" not in quantized_layers(model)
    for m in dict(tree_flatten(model.net.leaf_modules(), is_leaf=nn.Module.is_module)).values():
        if isinstance(m, nn.QuantizedLinear):
            assert (m.bits, m.group_size) == (bits, group_size)
    stored = quantized_reference(src, predicate, quantization)  # as `load` stores them for the CPU kernels
    if cpu_quant.available():
        cpu_quant.adopt(stored.net)
    assert_same_network(model, stored)
    assert model.transcribe(audio).tokens == reference.transcribe(audio).tokens


def test_voxtral_mlx_layout_is_detected(src, root):
    out = convert(src, root / "ours", q_bits=4)
    assert find_checkpoint(out.path).layout == "voxtral-mlx"


def test_official_layout_wins_over_a_config_json(src, root):
    path = root / "both"
    shutil.copytree(src, path)
    (path / "config.json").write_text(json.dumps({"model_type": "voxtral_realtime", "text_config": {},
                                                  "audio_config": {}}))
    assert find_checkpoint(path).layout == "official"


@pytest.mark.parametrize("layout", ["transformers", "voxmlx", "mlx-audio", "voxtral-mlx"])
def test_sanitize_is_idempotent(src, root, layout):
    path = {"transformers": lambda p: write_transformers(src, p), "voxmlx": lambda p: write_mlx(src, p, "voxmlx"),
            "mlx-audio": lambda p: write_mlx(src, p, "mlx-audio", {"group_size": 32, "bits": 4}),
            "voxtral-mlx": lambda p: convert(src, p, q_bits=8).path}[layout](root / f"idem-{layout}")
    net = load_model(src).net
    once = net.sanitize(read_weights(find_checkpoint(path)))
    twice = net.sanitize(once)
    assert once.keys() == twice.keys()
    assert all(mx.array_equal(once[k], twice[k]).item() for k in once)


# Strict loading of the other layouts.

def test_unexpected_tensor_in_a_foreign_layout(src, root):
    path = write_mlx(src, root / "extra", "voxmlx", extra={"language_model.output.weight": mx.zeros((4, 4))})
    with pytest.raises(WeightsError, match=re.escape(
            "model.safetensors does not match config.json: unexpected tensor language_model.output.weight")):
        voxtral_mlx.load(path)


def test_missing_tensor_in_a_foreign_layout(src, root):
    path = write_mlx(src, root / "missing", "mlx-audio")
    tensors = mx.load(str(path / "model.safetensors"))
    del tensors["decoder.layers.1.feed_forward_w2.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), tensors)
    with pytest.raises(WeightsError, match=re.escape(
            "model.safetensors does not match config.json: missing tensor layers.1.feed_forward.w2.weight "
            "(expected shape [64, 128])")):
        voxtral_mlx.load(path)


def test_quantized_tensor_without_a_quantizable_layer(src, root):
    path = write_mlx(src, root / "odd-scales", "voxmlx", extra={"language_model.norm.scales": mx.zeros((64, 1))})
    with pytest.raises(WeightsError, match=re.escape("model.safetensors: norm is stored quantized, but it is a RMSNorm")):
        voxtral_mlx.load(path)


@pytest.mark.parametrize("keep", ["half", 100])
def test_truncated_shard(src, root, keep):
    path = write_transformers(src, root / f"truncated-{keep}")
    file = path / "model-00002-of-00002.safetensors"
    size = file.stat().st_size
    os.truncate(file, size // 2 if keep == "half" else keep)
    with pytest.raises(WeightsError, match=f"^{re.escape(str(file))}: (not a readable safetensors file|truncated) \\("):
        voxtral_mlx.load(path)


# Directories in no supported layout.

def test_empty_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match=re.escape(
            f"{tmp_path} is not a Voxtral Realtime model directory: it holds no files, but a model needs {SUPPORTED}; "
            "to get the official model, download it with `hf download mistralai/Voxtral-Mini-4B-Realtime-2602")):
        voxtral_mlx.load(tmp_path)


def test_directory_of_other_files_names_them(tmp_path):
    for name in ("weights.bin", "readme.md", "tokenizer.model"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ModelNotFoundError, match=re.escape(
            f"{tmp_path} is not a Voxtral Realtime model directory: it holds readme.md, tokenizer.model, weights.bin, "
            f"but a model needs {SUPPORTED}")):
        voxtral_mlx.load(tmp_path)


def test_config_of_another_model(src, tmp_path):
    shutil.copyfile(src / "tekken.json", tmp_path / "tekken.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper", "d_model": 1280, "vocab_size": 51865}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=re.escape(
            f"{tmp_path / 'config.json'} is not the configuration of a Voxtral Realtime model in a layout this "
            f"package reads (model_type 'whisper'; keys: d_model, model_type, vocab_size); it reads {SUPPORTED}")):
        voxtral_mlx.load(tmp_path)


def test_config_layout_without_weights_or_tokenizer(src, root, tmp_path):
    path = write_mlx(src, tmp_path / "m", "mlx-audio")
    (path / "tekken.json").unlink()
    message = f"{path} holds a model in the mlx-audio layout without tekken.json"
    with pytest.raises(ModelNotFoundError, match=re.escape(message)):
        voxtral_mlx.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=re.escape(
            f"{path} holds a config.json of the mlx-audio layout but no model.safetensors (nor model.safetensors.index.json "
            "with its shards); the download is incomplete")):
        voxtral_mlx.load(path)


def test_index_naming_a_missing_shard(src, tmp_path):
    path = write_transformers(src, tmp_path / "hf")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=re.escape(
            f"{path}: model.safetensors.index.json lists missing shards: model-00002-of-00002.safetensors")):
        voxtral_mlx.load(path)


def test_newer_format_version_is_refused(src, tmp_path):
    out = convert(src, tmp_path / "ours").path
    config = json.loads((out / "config.json").read_text())
    config["format_version"] = 2
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(f"{out / 'config.json'} has format version 2; this voxtral-mlx "
                                                    "reads version 1 and older")):
        voxtral_mlx.load(out)


def test_transformers_config_missing_a_key(src, tmp_path):
    path = write_transformers(src, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    del config["text_config"]["intermediate_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape("config.json text_config is missing 'intermediate_size'")):
        voxtral_mlx.load(path)


# The hub.

def test_repo_in_another_layout_from_the_offline_cache(src, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "models--owner--model-4bit"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    write_mlx(src, repo_dir / "snapshots" / commit, "mlx-audio", {"group_size": 64, "bits": 4})
    model = voxtral_mlx.load("owner/model-4bit", dtype="float32")
    assert find_checkpoint(model.path).layout == "mlx-audio" and quantized_layers(model)
    (repo_dir / "snapshots" / commit / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=re.escape(
            "owner/model-4bit holds a config.json of the mlx-audio layout but no model.safetensors")):
        voxtral_mlx.load("owner/model-4bit")
