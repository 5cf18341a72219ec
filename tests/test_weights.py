"""Finding and loading a model: clear errors for bad directories, files and tensors; dtypes; the hub cache."""

import json
import os
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import checkpoint, forced_logits, load_model, speech, synthetic
from reference import read_safetensors
from tiny_checkpoint import write_checkpoint

import voxtral_mlx
from voxtral_mlx import mkl_bf16
from voxtral_mlx.config import ConfigError
from voxtral_mlx.weights import ModelNotFoundError, WeightsError, parse_dtype

P = "mm_streams_embeddings.embedding_module."
E = P + "whisper_encoder."
FILES = "params.json, consolidated.safetensors, tekken.json"
GET_OFFICIAL = ("download it with `hf download mistralai/Voxtral-Mini-4B-Realtime-2602 params.json "
                "consolidated.safetensors tekken.json --local-dir DIR` and pass that directory "
                "(voxtral-mlx --model DIR, or voxtral_mlx.load(DIR))")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def mismatch(problems: str) -> str:
    return exactly(f"consolidated.safetensors does not match params.json: {problems}")


def copy_model(src, dst, params=None, tekken=None):
    """A copy of a model directory, with `params` / `tekken` edits applied to the parsed JSON."""
    shutil.copytree(src, dst)
    for name, edit in (("params.json", params), ("tekken.json", tekken)):
        if edit is not None:
            data = json.loads((dst / name).read_text(encoding="utf-8"))
            edit(data)
            (dst / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Whatever a test resolves, the Hugging Face Hub is never contacted."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# Tensors.

@pytest.mark.parametrize("name,shape", [
    ("layers.1.feed_forward.w2.weight", [64, 128]),
    (P + "tok_embeddings.weight", [1314, 64]),
    (E + "transformer.layers.0.attention.wq.bias", [64]),
    (E + "conv_layers.0.conv.weight", [64, 128, 3]),  # in the checkpoint's [out, in, kernel] layout
])
def test_missing_tensor_is_named(ckpt_root, name, shape):
    path = checkpoint(ckpt_root, drop_tensors=(name,))
    with pytest.raises(WeightsError, match=mismatch(f"missing tensor {name} (expected shape {shape})")):
        voxtral_mlx.load(path, dtype="float32")


@pytest.mark.parametrize("name", ["layers.0.attention.wk.bias", "output.weight", E + "conv_layers.2.conv.weight"])
def test_unexpected_tensor_is_named(tmp_path, name):
    path = write_checkpoint(tmp_path / "ckpt", extra_tensors={name: np.zeros((64, 64, 3) if "conv" in name else (64,))})
    with pytest.raises(WeightsError, match=mismatch(f"unexpected tensor {name}")):
        voxtral_mlx.load(path, dtype="float32")


@pytest.mark.parametrize("name,bad,want", [
    ("layers.0.attention.wk.weight", (16, 64), [32, 64]),
    ("norm.weight", (65,), [64]),
    (P + "audio_language_projection.0.weight", (64, 64), [64, 256]),
    (E + "conv_layers.1.conv.weight", (64, 64, 5), [64, 64, 3]),
])
def test_misshapen_tensor_is_named(tmp_path, name, bad, want):
    path = write_checkpoint(tmp_path / "ckpt", reshape_tensors={name: bad})
    with pytest.raises(WeightsError, match=mismatch(f"tensor {name} has shape {list(bad)}, but params.json implies {want}")):
        voxtral_mlx.load(path, dtype="float32")


def test_many_problems_are_counted(tmp_path):
    names = [f"layers.1.{n}.weight" for n in ("attention_norm", "attention.wq", "attention.wk", "attention.wv",
                                              "attention.wo", "ffn_norm", "feed_forward.w1")]
    path = write_checkpoint(tmp_path / "ckpt", drop_tensors=names, extra_tensors={"extra.weight": np.zeros(3)})
    with pytest.raises(WeightsError) as e:
        voxtral_mlx.load(path, dtype="float32")
    message = str(e.value)
    assert message.startswith("consolidated.safetensors does not match params.json: missing tensor layers.1.")
    assert message.endswith(" (and 3 more)")
    assert message.count("; ") == 4 and message.count("missing tensor") == 5


@pytest.mark.parametrize("keep", ["half", "all but one byte", 100, 5, 0])
def test_truncated_weights(tmp_path, tiny_dir, keep):
    path = copy_model(tiny_dir, tmp_path / "model")
    file = path / "consolidated.safetensors"
    size = file.stat().st_size
    os.truncate(file, {"half": size // 2, "all but one byte": size - 1}.get(keep, keep))
    with pytest.raises(WeightsError, match=f"^{re.escape(str(file))}: (not a readable safetensors file|truncated) \\("):
        voxtral_mlx.load(path, dtype="float32")


def test_weights_that_are_not_safetensors(tmp_path, tiny_dir):
    path = copy_model(tiny_dir, tmp_path / "model")
    (path / "consolidated.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    file = re.escape(str(path / "consolidated.safetensors"))
    with pytest.raises(WeightsError, match=f"^{file}: not a readable safetensors file \\("):
        voxtral_mlx.load(path, dtype="float32")


# Finding the model.

@pytest.mark.parametrize("missing", ["tekken.json", "params.json", "consolidated.safetensors"])
def test_directory_missing_a_file(tmp_path, tiny_dir, missing):
    path = copy_model(tiny_dir, tmp_path / "model")
    (path / missing).unlink()
    with pytest.raises(ModelNotFoundError, match=exactly(
            f"{path} is not a Voxtral Realtime model directory: {missing} missing (it needs {FILES}); "
            f"to get the official model, {GET_OFFICIAL}")):
        voxtral_mlx.load(path)


def test_file_instead_of_directory(tiny_dir):
    message = f"{tiny_dir / 'params.json'} is a file; pass the directory that holds {FILES}"
    with pytest.raises(ModelNotFoundError, match=exactly(message)):
        voxtral_mlx.load(tiny_dir / "params.json")


@pytest.mark.parametrize("name", ["no_such_model", "./no/such", "~/no/such/model", "a/b/c", "../no_such_model_dir"])
def test_nonexistent_path_that_is_no_repo_id(name):
    with pytest.raises(ModelNotFoundError, match=exactly(
            f"{name}: no such model directory (nor a Hugging Face repo id like mistralai/Voxtral-Mini-4B-Realtime-2602)")):
        voxtral_mlx.load(name)


def test_absolute_nonexistent_path(tmp_path):
    name = str(tmp_path / "nope" / "model")
    with pytest.raises(ModelNotFoundError, match=f"^{re.escape(name)}: no such model directory"):
        voxtral_mlx.load(name)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache; `add(repo, src)` puts a model directory in it."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def add(repo, src):
        root = cache / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(COMMIT)
        shutil.copytree(src, root / "snapshots" / COMMIT)
        return root / "snapshots" / COMMIT

    return add


def test_repo_id_from_the_offline_cache(hub, tiny_dir):
    snapshot = hub("owner/name", tiny_dir)
    model = voxtral_mlx.load("owner/name", dtype="float32")
    assert model.path.resolve() == snapshot.resolve()
    audio = synthetic(2.0)
    assert model.transcribe(audio).tokens == load_model(tiny_dir).transcribe(audio).tokens


def test_unknown_repo_id_offline_says_how_to_download(hub):
    with pytest.raises(ModelNotFoundError) as e:
        voxtral_mlx.load("owner/missing")
    message = str(e.value)
    assert message.startswith("owner/missing is not in the local Hugging Face cache and could not be downloaded (")
    # The whole repo: another layout than the official one (converted, mlx-audio) has other files.
    assert message.endswith("; download it with `hf download owner/missing --local-dir DIR` and pass that directory "
                            "(voxtral-mlx --model DIR, or voxtral_mlx.load(DIR))")
    assert "\n" not in message


def test_a_home_directory_of_no_user(tmp_path):
    with pytest.raises(ModelNotFoundError, match=re.escape("~no_such_user_zz/model: no such model directory "
                                                           "(no home directory for its ~)")):
        voxtral_mlx.load("~no_such_user_zz/model")


def test_the_path_is_absolute(tiny_dir, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    assert voxtral_mlx.load(tiny_dir.name).path == tiny_dir.absolute()


def test_default_model_offline_says_how_to_download(hub):
    with pytest.raises(ModelNotFoundError, match=re.escape("`hf download mistralai/Voxtral-Mini-4B-Realtime-2602 "
                                                           "params.json consolidated.safetensors tekken.json")):
        voxtral_mlx.load()


def test_incomplete_cached_snapshot_says_how_to_download(hub, tiny_dir):
    snapshot = hub("owner/name", tiny_dir)
    (snapshot / "tekken.json").unlink()
    with pytest.raises(ModelNotFoundError, match=re.escape("hf download owner/name")):
        voxtral_mlx.load("owner/name")


# Dtypes.

@pytest.mark.parametrize("given,want", [
    ("bf16", mx.bfloat16), ("bfloat16", mx.bfloat16), ("BF16", mx.bfloat16), ("float16", mx.float16),
    ("fp16", mx.float16), ("float32", mx.float32), ("fp32", mx.float32), (mx.bfloat16, mx.bfloat16),
    (mx.float16, mx.float16), (mx.float32, mx.float32),
])
def test_parse_dtype(given, want):
    assert parse_dtype(given) == want


def test_default_dtype_follows_the_device():
    assert parse_dtype(None) == (mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32)


@pytest.mark.parametrize("bad", ["int8", "float64", "", "bf", "q4", mx.int32, mx.float64, 16])
def test_bad_dtype(bad):
    with pytest.raises(ValueError, match=exactly(f"dtype {bad!r} is not supported; use float32, bfloat16 or float16")):
        parse_dtype(bad)


def test_bad_dtype_fails_loading(tiny_dir):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        voxtral_mlx.load(tiny_dir, dtype="int8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameters_hold_the_stored_values_in_the_compute_dtype(tiny_dir, dtype):
    model = load_model(tiny_dir, dtype)
    want = getattr(mx, dtype)
    # bfloat16 on a CPU with MKL, and float32 (this checkpoint being bfloat16) with AMX too: the
    # products' weights stay bfloat16, the rest is float32 (test_mkl_bf16 checks which is which).
    mkl = mkl_bf16.adopted(model.net)
    cpu = mx.default_device() == mx.cpu
    assert mkl == (cpu and (mkl_bf16.float32_available() if dtype == "float32" else mkl_bf16.available()))
    assert model.dtype == (mx.float32 if mkl else want)
    params = dict(tree_flatten(model.net.parameters()))
    stored = read_safetensors(tiny_dir / "consolidated.safetensors")
    assert params.keys() == stored.keys()
    for name, w in params.items():
        assert w.dtype in ((mx.bfloat16, mx.float32) if mkl else (want,)), name
        got = np.array(w.astype(mx.float32))
        if got.ndim == 3:
            got = got.swapaxes(1, 2)  # MLX conv kernels are [out, kernel, in]
        # The file is bfloat16: both dtypes hold its values exactly.
        np.testing.assert_array_equal(got, stored[name], err_msg=name)


def forced_argmax(model, audio, tokens, delay_ms=480):
    """Greedy ids when every position's input token is forced to `tokens` (teacher forcing), with margins."""
    logits = forced_logits(model, audio, tokens, delay_ms)
    top = np.sort(logits, axis=-1)
    return logits.argmax(-1).tolist(), top[:, -1] - top[:, -2]


@pytest.mark.parametrize("audio", ["jfk", "synthetic"])
def test_bfloat16_agrees_with_float32(tiny_dir, audio):
    x = speech("jfk")[: 6 * 16000] if audio == "jfk" else synthetic(4.0)
    f32, bf16 = load_model(tiny_dir, "float32"), load_model(tiny_dir, "bfloat16")
    tokens = f32.transcribe(x).tokens
    ids32, margins = forced_argmax(f32, x, tokens)
    assert ids32[: len(tokens)] == tokens  # the forced run is the transcription
    # Free-running, one flipped argmax changes every later input; forced, each position is
    # compared on its own. bfloat16 keeps about 3 significant digits: it may flip argmaxes
    # whose float32 margin is small, no others, and at most 10% of them.
    ids16, _ = forced_argmax(bf16, x, tokens)
    same = np.array(ids16[: len(tokens)]) == np.array(tokens)
    assert same.mean() >= 0.9
    assert np.all(margins[: len(tokens)][~same] < 2.0)
    assert len(bf16.transcribe(x).tokens) == len(tokens)


# Configuration.

def test_params_without_multimodal_section(tmp_path, tiny_dir):
    path = copy_model(tiny_dir, tmp_path / "model", params=lambda p: p.pop("multimodal"))
    with pytest.raises(ConfigError, match=exactly("params.json has no multimodal.whisper_model_args section "
                                                  "('multimodal'); is this a Voxtral Realtime checkpoint?")):
        voxtral_mlx.load(path)


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.pop("dim"), "params.json is missing 'dim'"),
    (lambda p: p["multimodal"]["whisper_model_args"]["encoder_args"].pop("n_layers"),
     "params.json encoder_args is missing 'n_layers'"),
    (lambda p: p.update(n_heads=3), "params.json: decoder n_heads 3 is not a multiple of n_kv_heads 2"),
    (lambda p: p.update(vocab_size=2000), "tekken.json has 1314 tokens, params.json vocab_size is 2000"),
])
def test_params_errors(tmp_path, tiny_dir, edit, message):
    path = copy_model(tiny_dir, tmp_path / "model", params=edit)
    with pytest.raises(ConfigError, match=exactly(message)):
        voxtral_mlx.load(path)


def test_tekken_without_audio_section(tmp_path, tiny_dir):
    path = copy_model(tiny_dir, tmp_path / "model", tekken=lambda t: t.pop("audio"))
    with pytest.raises(ConfigError, match=exactly(f"{path / 'tekken.json'} has no audio section: "
                                                  "not a Voxtral Realtime tokenizer")):
        voxtral_mlx.load(path)


def test_tekken_audio_section_missing_a_key(tmp_path, tiny_dir):
    path = copy_model(tiny_dir, tmp_path / "model", tekken=lambda t: t["audio"].pop("streaming_n_left_pad_tokens"))
    with pytest.raises(ConfigError, match=exactly("tekken.json audio section is missing 'streaming_n_left_pad_tokens'")):
        voxtral_mlx.load(path)


def test_bad_default_delay_in_tekken_names_the_file(tmp_path, tiny_dir):
    path = copy_model(tiny_dir, tmp_path / "model", tekken=lambda t: t["audio"].update(transcription_delay_ms=100))
    with pytest.raises(ConfigError, match="tekken.json.*transcription_delay_ms"):
        voxtral_mlx.load(path)


def test_tekken_and_params_disagreeing_on_the_rate(tmp_path, tiny_dir):
    path = copy_model(tiny_dir, tmp_path / "model", tekken=lambda t: t["audio"].update(sampling_rate=24000))
    with pytest.raises(ConfigError, match=exactly("tekken.json audio sampling_rate=24000 disagrees with params.json "
                                                  "audio_encoding_args sampling_rate=16000")):
        voxtral_mlx.load(path)


def test_tekken_and_params_disagreeing_on_mel_bins(tmp_path, tiny_dir):
    path = copy_model(tiny_dir, tmp_path / "model",
                      tekken=lambda t: t["audio"]["audio_encoding_config"].update(num_mel_bins=80))
    with pytest.raises(ConfigError, match=exactly("tekken.json audio num_mel_bins=80 disagrees with params.json "
                                                  "audio_encoding_args num_mel_bins=128")):
        voxtral_mlx.load(path)


def test_default_delay_comes_from_tekken(ckpt_root, tiny_dir):
    model = voxtral_mlx.load(checkpoint(ckpt_root, delay_ms=960), dtype="float32")
    assert model.stream().delay_ms == 960
    assert load_model(tiny_dir).stream().delay_ms == 480
    x = synthetic(3.0)
    result = model.transcribe(x)
    assert result.delay_ms == 960
    # Same weights (same seed): only the default delay differs.
    assert result.tokens == load_model(tiny_dir).transcribe(x, delay_ms=960).tokens
    assert result.tokens != load_model(tiny_dir).transcribe(x).tokens


@pytest.fixture(scope="module")
def wider_dir(tmp_path_factory):
    """A 42 MB checkpoint (layers of 512 x 2048), its 4-bit conversion and a float32 copy."""
    from voxtral_mlx.convert import convert

    root = tmp_path_factory.mktemp("wider")
    path = write_checkpoint(root / "bf16", dim=512, hidden_dim=2048, n_layers=4, n_heads=8, n_kv_heads=2,
                            head_dim=64, enc_dim=256, enc_layers=4, enc_heads=4, enc_head_dim=64, enc_hidden=1024)
    return {"bf16": path, "q4": convert(path, root / "q4", q_bits=4).path,
            "f32": convert(path, root / "f32", dtype="float32").path}


@pytest.mark.parametrize("stored,dtype", [("bf16", "float32"), ("bf16", "bfloat16"), ("f32", "float32"),
                                          ("q4", "float32")])
def test_loading_holds_the_model_once(wider_dir, stored, dtype):
    # Tensors are cast, replaced (the CPU paths' layers) and stored for the kernels (in place)
    # one at a time: MLX's peak memory while loading is the loaded model's and little more.
    # (4-bit weights stored for AMX as new arrays while the loaded ones are still held: 1.9x.)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = voxtral_mlx.load(wider_dir[stored], dtype=dtype)
    peak = mx.get_peak_memory() - before
    held = sum(p.nbytes for _, p in tree_flatten(model.net.parameters()))
    assert held > 10 * 2**20 and peak <= 1.1 * held + 2**20, (peak, held)


def test_a_weight_file_cut_short_while_loading_says_so(wider_dir, tmp_path, monkeypatch):
    # The file is cut after its size was checked against its header, as when it is replaced
    # during the load: a tensor past the cut fails to read, as read or as cast, and is named.
    real = voxtral_mlx.weights.check_weights
    for stored, dtype in [("f32", "float32"), ("bf16", "float16")]:
        path = copy_model(wider_dir[stored], tmp_path / stored)
        (file,) = path.glob("*.safetensors")
        monkeypatch.setattr(voxtral_mlx.weights, "check_weights",
                            lambda *a, file=file: (real(*a), os.truncate(file, file.stat().st_size // 2)))
        damaged = "the file is damaged or was changed while loading: download or convert it again"
        with pytest.raises(WeightsError, match=f"^{re.escape(str(file))}: cannot read tensor \\S+ \\(.*\\); {damaged}$"):
            voxtral_mlx.load(path, dtype=dtype)
    # A later evaluation is not troubled by the failed reads.
    assert mx.ones((64, 64)).sum().item() == 4096


def test_a_tensor_that_cannot_be_held_is_not_called_a_damaged_file(tiny_dir, monkeypatch):
    def eval_(*a):
        raise RuntimeError("[malloc] Unable to allocate 4096 bytes.")

    monkeypatch.setattr(voxtral_mlx.weights.mx, "eval", eval_)
    with pytest.raises(WeightsError, match=r"consolidated\.safetensors: cannot read tensor \S+ \(\[malloc\] Unable to "
                                           r"allocate 4096 bytes\.\)$"):
        voxtral_mlx.load(tiny_dir, dtype="float16")
