"""Finding a model directory in any supported layout, reading its configuration and loading its weights.

Layouts, told apart by their files (see `find_checkpoint`):

- official (Mistral): params.json + consolidated.safetensors + tekken.json;
- voxtral-mlx (written by `voxtral-mlx convert`): config.json with `"format": "voxtral-mlx"`
  + model.safetensors (or shards and model.safetensors.index.json) + tekken.json;
- Hugging Face transformers (`VoxtralRealtimeForConditionalGeneration`): config.json with
  `text_config` and `audio_config`;
- voxmlx: config.json holding params.json's keys (`multimodal`), optionally `quantization`;
- mlx-audio: config.json with `decoder` and `encoder_args`, optionally `quantization`.

Whatever the layout, `VoxtralRealtime.sanitize` maps the tensor names onto the official ones,
and layers stored quantized (with `.scales`) are quantized with the bits and group size their
shapes imply.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import _blas, cpu_quant, mkl_bf16, packs, states
from .config import AudioArgs, ConfigError, ModelArgs
from .model import VoxtralRealtime
from .tokenizer import Tekken
from .transcribe import Voxtral

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"
MODEL_FILES = ("params.json", "consolidated.safetensors", "tekken.json")
# What `voxtral-mlx convert` writes; a reader refuses versions newer than its own.
FORMAT = "voxtral-mlx"
FORMAT_VERSION = 1
LAYOUT_NAMES = {"official": "official Mistral", "voxtral-mlx": "voxtral-mlx", "transformers": "Hugging Face transformers",
                "voxmlx": "voxmlx", "mlx-audio": "mlx-audio"}
SUPPORTED_LAYOUTS = ("params.json + consolidated.safetensors + tekken.json (official), or config.json + "
                     "model.safetensors + tekken.json (voxtral-mlx, Hugging Face transformers, voxmlx, mlx-audio)")
DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files of every layout but the weights: fetched first, to tell which weights a repo needs.
_CONFIG_FILES = ("params.json", "config.json", "tekken.json", "model.safetensors.index.json",
                 "preprocessor_config.json")


class ModelNotFoundError(FileNotFoundError):
    """No model at the given path or repo id; the message says how to get one."""


class WeightsError(ValueError):
    """The weights file is unreadable or does not match the configuration."""


@dataclass
class Checkpoint:
    """A model directory and its layout (a key of `LAYOUT_NAMES`)."""

    path: Path
    layout: str
    config_file: str
    config: dict = field(repr=False)
    weight_files: list[Path]

    @property
    def weights_name(self) -> str:
        """How messages name the weights: the file, or the index of the shards."""
        if len(self.weight_files) == 1:
            return self.weight_files[0].name
        return "model.safetensors.index.json"


def _get_instructions(repo: str, files: tuple[str, ...] | None = MODEL_FILES) -> str:
    files = " ".join(files or ())
    return (f"download it with `hf download {repo} {files + ' ' if files else ''}--local-dir DIR` and pass that "
            f"directory (voxtral-mlx --model DIR, or voxtral_mlx.load(DIR))")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} does not hold a JSON object")
    return data


def _config_layout(config: dict, file: Path) -> str:
    if config.get("format") == FORMAT:
        version = config.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(f"{file} has format version {version!r}; this voxtral-mlx reads version "
                              f"{FORMAT_VERSION} and older: upgrade voxtral-mlx, or convert the model again")
        return "voxtral-mlx"
    if "text_config" in config and "audio_config" in config:
        return "transformers"
    if "multimodal" in config:
        return "voxmlx"
    if "decoder" in config and "encoder_args" in config:
        return "mlx-audio"
    keys = ", ".join(sorted(config)[:8]) + (", ..." if len(config) > 8 else "")
    raise ModelNotFoundError(
        f"{file} is not the configuration of a Voxtral Realtime model in a layout this package reads "
        f"(model_type {config.get('model_type')!r}; keys: {keys or 'none'}); it reads {SUPPORTED_LAYOUTS}")


def find_checkpoint(path: Path, repo: str | None = None) -> Checkpoint:
    """The layout of a model directory, from its files (`repo`: the repo id it was fetched from)."""
    files = sorted(f.name for f in path.iterdir() if f.is_file()) if path.is_dir() else []
    if all(f in files for f in MODEL_FILES):
        return Checkpoint(path, "official", "params.json", _read_json(path / "params.json"),
                          [path / "consolidated.safetensors"])
    if "config.json" in files:
        return _config_checkpoint(path, files, repo)
    if "params.json" in files or "consolidated.safetensors" in files:
        missing = ", ".join(f for f in MODEL_FILES if f not in files)
        if repo is not None:
            raise ModelNotFoundError(
                f"{repo} has no {missing}: its download is incomplete, or it is not a Voxtral Realtime "
                f"checkpoint in the official layout; {_get_instructions(repo)}")
        raise ModelNotFoundError(
            f"{path} is not a Voxtral Realtime model directory: {missing} missing "
            f"(it needs {', '.join(MODEL_FILES)}); to get the official model, {_get_instructions(DEFAULT_MODEL)}")
    found = ", ".join(files[:8]) + (f" and {len(files) - 8} more files" if len(files) > 8 else "")
    where = repo if repo is not None else f"{path}"
    how = _get_instructions(repo, None) if repo is not None else (
        f"to get the official model, {_get_instructions(DEFAULT_MODEL)}")
    raise ModelNotFoundError(
        f"{where} is not a Voxtral Realtime model directory: it holds {found or 'no files'}, but a model needs "
        f"{SUPPORTED_LAYOUTS}; {how}")


def _config_checkpoint(path: Path, files: list[str], repo: str | None) -> Checkpoint:
    config = _read_json(path / "config.json")
    layout = _config_layout(config, path / "config.json")
    where = repo if repo is not None else str(path)
    name = LAYOUT_NAMES[layout]
    if "model.safetensors.index.json" in files:
        index = _read_json(path / "model.safetensors.index.json")
        shards = sorted(set((index.get("weight_map") or {}).values()))
        missing = [s for s in shards if s not in files]
        if not shards or missing:
            raise ModelNotFoundError(
                f"{where}: model.safetensors.index.json lists {'no shards' if not shards else 'missing shards'}"
                f"{': ' + ', '.join(missing) if missing else ''}; the download is incomplete")
        weight_files = [path / s for s in shards]
    elif "model.safetensors" in files:
        weight_files = [path / "model.safetensors"]
    else:
        raise ModelNotFoundError(f"{where} holds a config.json of the {name} layout but no model.safetensors (nor "
                                 "model.safetensors.index.json with its shards); the download is incomplete")
    if "tekken.json" not in files:
        raise ModelNotFoundError(
            f"{where} holds a model in the {name} layout without tekken.json, Mistral's tokenizer file that "
            f"also holds the audio settings; copy it from the official model ({_get_instructions(DEFAULT_MODEL, ('tekken.json',))})")
    return Checkpoint(path, layout, "config.json", config, weight_files)


def resolve_model(path_or_repo: str | Path = DEFAULT_MODEL) -> Path:
    """A local model directory in any supported layout, or a Hugging Face repo id fetched into the
    hub cache (only the files its layout needs)."""
    try:
        path = Path(path_or_repo).expanduser()
    except RuntimeError:  # ~user of no user
        raise ModelNotFoundError(f"{path_or_repo}: no such model directory (no home directory for its ~)") from None
    if path.is_dir():
        find_checkpoint(path)
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the directory that holds {', '.join(MODEL_FILES)}")
    repo = str(path_or_repo)
    if not _REPO_ID.match(repo) or repo.startswith((".", "~")):
        raise ModelNotFoundError(f"{repo}: no such model directory (nor a Hugging Face repo id like {DEFAULT_MODEL})")
    return _download(repo)


def _download(repo: str) -> Path:
    path = _snapshot(repo, _CONFIG_FILES)
    # The official repo also holds transformers weights: fetch only the ones the layout reads.
    official = (path / "params.json").is_file()
    path = _snapshot(repo, _CONFIG_FILES + ("consolidated.safetensors" if official else "model*.safetensors",))
    if official and not (path / "consolidated.safetensors").is_file() and (path / "config.json").is_file():
        path = _snapshot(repo, _CONFIG_FILES + ("model*.safetensors",))
    find_checkpoint(path, repo)
    return path


def _snapshot(repo: str, patterns: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=list(patterns)))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is gated: accept its terms at https://huggingface.co/{repo} and log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo}: no such model on the Hugging Face Hub (check the name; log in with `hf auth login` if it is private)"
        ) from None
    except Exception as e:  # offline, network or cache errors all end the same way for the user
        raise ModelNotFoundError(
            f"{repo} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            f"{_get_instructions(repo, MODEL_FILES if repo == DEFAULT_MODEL else None)}"
        ) from None


def default_dtype() -> mx.Dtype:
    """float32 on the CPU (half-precision matmuls are slow loops there), bfloat16 on a GPU."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def blas_backend() -> str:
    """What serves MLX's CPU matmuls: MKL or OpenBLAS (loaded by `_blas` or LD_PRELOAD), or the
    mlx-cpu wheel's reference BLAS."""
    if sys.platform == "darwin":
        return "Accelerate"
    if _blas.loaded is not None:
        return _blas.loaded
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in preload.replace(":", " ").split():
        if any(name in lib for name in ("openblas", "mkl", "blis")):
            return f"{lib} (LD_PRELOAD)"
    return f"reference BLAS of the mlx-cpu wheel ({_blas.reason})"


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, mx.Dtype):
        if dtype in DTYPES.values():
            return dtype
    elif str(dtype).lower() in DTYPES:
        return DTYPES[str(dtype).lower()]
    raise ValueError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """Tensors of a safetensors file, mapped lazily (read from disk when evaluated)."""
    try:
        weights = mx.load(str(path))
    except Exception as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    end = 0
    for w in weights.values():
        end += w.nbytes
    if end > path.stat().st_size:
        raise WeightsError(f"{path}: truncated ({path.stat().st_size} bytes, its tensors need {end})")
    return weights


def read_weights(ckpt: Checkpoint, origins: dict | None = None) -> dict[str, mx.array]:
    """All tensors of a checkpoint, from one file or its shards, mapped lazily. `origins`, where
    given, receives each tensor's (file, array) by name."""
    weights: dict[str, mx.array] = {}
    for file in ckpt.weight_files:
        for name, w in read_safetensors(file).items():
            if name in weights:
                raise WeightsError(f"{file}: tensor {name} is also in another shard")
            weights[name] = w
            if origins is not None:
                origins[name] = (file, w)
    return weights


# numpy's dtype for a safetensors dtype (bfloat16 as its bits)
MAPPED_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "U8": np.uint8, "U16": np.uint16,
                 "U32": np.uint32}


def mapped_tensors(path: Path, names: Iterable[str], dtypes: Iterable[str] = tuple(MAPPED_DTYPES)
                   ) -> dict[str, np.ndarray]:
    """The tensors `names` of a safetensors file as numpy views of a read-only mapping of the
    file (bfloat16 as its bits, uint16): those it holds whole in one of `dtypes`; {} if it
    cannot be mapped."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        data = np.memmap(path, np.uint8, mode="r")
    except (OSError, ValueError, struct.error):
        return {}
    start, out, dtypes = 8 + size, {}, set(dtypes) & set(MAPPED_DTYPES)
    for name in names:
        info = header.get(name)
        if not isinstance(info, dict) or info.get("dtype") not in dtypes:
            continue
        (a, b), shape, dtype = info["data_offsets"], info["shape"], np.dtype(MAPPED_DTYPES[info["dtype"]])
        if b - a != dtype.itemsize * int(np.prod(shape)) or a % dtype.itemsize or start + b > data.size:
            continue
        out[name] = data[start + a : start + b].view(dtype).reshape(shape)
    return out


def stored_bits(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The bfloat16 tensors `names` of a safetensors file as numpy uint16 views of a read-only
    mapping of the file (those it holds whole, as bfloat16; {} if it cannot be mapped)."""
    return mapped_tensors(path, names, ("BF16",))


def mapped_products(net: VoxtralRealtime, weights: dict[str, mx.array], origins: dict) -> dict[str, np.ndarray]:
    """The weights of the products (linear layers, embeddings) that are a stored bfloat16 tensor
    as is (not reordered from another layout), as numpy views of their file's mapping, by
    parameter name. The CPU paths of `mkl_bf16` multiply them there: the load reads nothing of
    them, and their memory is the system's file cache, which the next process finds filled
    (fresh memory cost about 1 s per GB in page faults on a Linux VM: most of a load)."""
    stored = {id(w): (file, name, w) for name, (file, w) in origins.items()}
    wanted: dict[Path, dict[str, str]] = {}
    for path, module in net.named_modules():
        if type(module) in (nn.Linear, nn.Embedding):
            name = f"{path}.weight"
            w = weights.get(name)
            origin = stored.get(id(w))
            if origin is not None and origin[2] is w and w.dtype == mx.bfloat16:
                wanted.setdefault(origin[0], {})[origin[1]] = name
    mapped = {}
    for file, names in wanted.items():
        for stored_name, bits in stored_bits(file, names.keys()).items():
            if tuple(bits.shape) == tuple(weights[names[stored_name]].shape):
                mapped[names[stored_name]] = bits
    return mapped


def quantize_like(net: VoxtralRealtime, weights: dict[str, mx.array], mode: str = "affine",
                  source: str = "the weights") -> dict[str, dict]:
    """Quantize the layers the weights hold quantized (those with `.scales`), with the bits and
    group size their shapes imply. Returns the parameters of each quantized layer by path."""
    layers = {}
    for path, module in tree_flatten(net.leaf_modules(), is_leaf=nn.Module.is_module):
        scales = weights.get(f"{path}.scales")
        if scales is None:
            continue
        packed = weights.get(f"{path}.weight")
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise WeightsError(f"{source}: {path} is stored quantized, but it is a {type(module).__name__}")
        if packed is None:
            raise WeightsError(f"{source}: {path} has scales but no weight")
        in_dims = module.weight.shape[1]
        bits, bits_rest = divmod(packed.shape[-1] * 32, in_dims)
        group_size, group_rest = divmod(in_dims, max(1, scales.shape[-1]))
        if packed.ndim != 2 or bits_rest or group_rest or bits not in (2, 3, 4, 5, 6, 8):
            raise WeightsError(
                f"{source}: tensors {path}.weight {list(packed.shape)} and {path}.scales {list(scales.shape)} "
                f"are no quantization of a layer with {in_dims} inputs")
        layers[path] = {"group_size": group_size, "bits": bits, "mode": mode}
    if layers:
        nn.quantize(net, class_predicate=lambda path, _: dict(layers[path]) if path in layers else False)
    return layers


def check_weights(net: VoxtralRealtime, weights: dict[str, mx.array], source: str, config: str = "params.json"):
    """Missing, unexpected or misshapen tensors are errors that name the tensors."""
    expected = dict(tree_flatten(net.parameters()))
    problems = []
    missing = [n for n in expected if n not in weights]
    unexpected = [n for n in weights if n not in expected]
    for name in missing:
        problems.append(f"missing tensor {name} (expected shape {_checkpoint_shape(expected[name].shape)})")
    for name in unexpected:
        problems.append(f"unexpected tensor {name}")
    for name, w in weights.items():
        if name in expected and w.shape != expected[name].shape:
            problems.append(f"tensor {name} has shape {list(w.shape)}, but {config} implies "
                            f"{_checkpoint_shape(expected[name].shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise WeightsError(f"{source} does not match {config}: {'; '.join(problems[:5])}{more}")


def _checkpoint_shape(shape) -> list[int]:
    # Conv kernels are [out, kernel, in] in MLX and [out, in, kernel] in the checkpoint.
    return [shape[0], shape[2], shape[1]] if len(shape) == 3 else list(shape)


def read_config(ckpt: Checkpoint) -> tuple[ModelArgs, Tekken, AudioArgs]:
    """The network, tokenizer and audio settings of a checkpoint, checked against each other."""
    source, config = ckpt.config_file, ckpt.config
    if ckpt.layout in ("official", "voxmlx"):
        args = ModelArgs.from_params(config, source)
    elif ckpt.layout == "mlx-audio":
        args = ModelArgs.from_mlx_audio(config, source)
    elif ckpt.layout == "transformers":
        pre = ckpt.path / "preprocessor_config.json"
        args = ModelArgs.from_transformers(config, _read_json(pre) if pre.is_file() else None, source)
    else:
        args = ModelArgs.from_dict(config.get("model") or {}, source)
    tokenizer = Tekken.from_file(ckpt.path / "tekken.json")
    if ckpt.layout == "voxtral-mlx":
        audio = AudioArgs.from_dict(config.get("audio"), source)
    else:
        if tokenizer.audio is None:
            raise ConfigError(f"{ckpt.path / 'tekken.json'} has no audio section: not a Voxtral Realtime tokenizer")
        audio = AudioArgs.from_files(tokenizer.audio, args, source)
    if tokenizer.vocab_size != args.decoder.vocab_size:
        raise ConfigError(f"tekken.json has {tokenizer.vocab_size} tokens, {source} vocab_size is "
                          f"{args.decoder.vocab_size}")
    return args, tokenizer, audio


def load_config(path: Path) -> tuple[ModelArgs, Tekken, AudioArgs]:
    """The network, tokenizer and audio settings of a model directory in any supported layout."""
    return read_config(find_checkpoint(Path(path)))


def load_network(ckpt: Checkpoint, origins: dict | None = None
                 ) -> tuple[VoxtralRealtime, dict[str, mx.array], Tekken, AudioArgs]:
    """The network (quantized as stored) and its checked weights, mapped lazily, not yet loaded
    (`origins`: see `read_weights`)."""
    args, tokenizer, audio = read_config(ckpt)
    net = VoxtralRealtime(args, audio)
    weights = net.sanitize(read_weights(ckpt, origins))
    quantization = ckpt.config.get("quantization") if isinstance(ckpt.config.get("quantization"), dict) else {}
    quantize_like(net, weights, quantization.get("mode", "affine"), ckpt.weights_name)
    check_weights(net, weights, ckpt.weights_name, ckpt.config_file)
    return net, weights, tokenizer, audio


def read_tensor(ckpt: Checkpoint, name: str, w: mx.array):
    """Evaluate one tensor of a checkpoint (the load reads them one at a time: in groups of 256 MB,
    as one graph each, an 8-bit model loaded 1.5-2.5 s faster, but MLX let a failed read's error
    surface in a later, unrelated evaluation, and once abort the process)."""
    try:
        mx.eval(w)
    except RuntimeError as e:
        hint = ("; the file is damaged or was changed while loading: download or convert it again"
                if "read" in str(e).lower() else "")  # (not where memory ran out)
        raise WeightsError(f"{ckpt.path / ckpt.weights_name}: cannot read tensor {name} ({e}){hint}") from None


def load(path_or_repo: str | Path = DEFAULT_MODEL, dtype: str | mx.Dtype | None = None) -> Voxtral:
    """Load Voxtral Realtime.

    Args:
        path_or_repo: a model directory or a Hugging Face repo id (default: the official
            model; only the files its layout needs are downloaded, into the Hugging Face
            cache). Layouts: the official one (params.json, consolidated.safetensors,
            tekken.json), one written by `voxtral-mlx convert`, Hugging Face transformers,
            voxmlx and mlx-audio (config.json, model.safetensors, tekken.json).
        dtype: compute dtype: "float32" (default on CPU), "bfloat16" (default on GPU) or "float16".
            Float weights are cast while loading; quantized layers stay quantized, their
            scales in this dtype. On an x86-64 CPU with MKL (the `mkl` extra), "bfloat16"
            keeps the weights of the products bfloat16 and multiplies them with MKL, about
            twice as fast as float32 weights, the rest in float32 (see `mkl_bf16`); with
            AVX-512 or AMX too, "float32" over a bfloat16 checkpoint keeps them bfloat16 as
            well and multiplies them in float32 (half the memory, a decoder step 1.9x as fast
            as over float32 weights with AMX, 2.8x on a Zen 4 with AVX-512). On a CPU with
            AVX-512, 4- and 8-bit layers multiply through a kernel, the rest in float32 whatever
            the dtype (see `cpu_quant`). Where these CPU paths multiply a bfloat16 weight as
            stored, they read it in a mapping of its file (`mapped_products`): it is not read
            at load, and its memory is the system's file cache. So are quantized layers
            stored for the AMX or VNNI kernel from a model's second load on: the first keeps
            them on disk (`packs`; `VOXTRAL_MLX_PACKS=off` stores them in memory each time).
    """
    path = resolve_model(path_or_repo)
    dtype = parse_dtype(dtype)
    ckpt = find_checkpoint(path)
    origins: dict = {}
    net, weights, tokenizer, audio = load_network(ckpt, origins)
    cpu = mx.default_device() == mx.cpu
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in net.named_modules())
    # float32 on a CPU with MKL and a row kernel, over a bfloat16 checkpoint (every tensor bfloat16, none
    # quantized): the products' weights stay bfloat16 (half the memory and bytes per step) and
    # multiply in float32 (`mkl_bf16`).
    over_bf16 = (dtype == mx.float32 and cpu and all(w.dtype == mx.bfloat16 for w in weights.values())
                 and mkl_bf16.float32_available())
    # MLX's CPU bfloat16 matmul is a loop; MKL's and the row kernels' run at memory speed, in the
    # file's own mapping where the weight is stored as they take it (those stay lazy here).
    mkl = over_bf16 or (dtype == mx.bfloat16 and cpu and not quantized and mkl_bf16.available())
    mapped = mapped_products(net, weights, origins) if mkl else {}
    origins.clear()
    # The quantized layers as the CPU kernel stores them, kept on disk by an earlier load (`packs`).
    store = packs.store_for(ckpt.path, ckpt.weight_files) if quantized and cpu_quant.available() else None
    packable = cpu_quant.packable(net) if store is not None else {}
    kept = store.read(packable) if packable else {}
    unread = {f"{path}.{part}" for path in kept for part in ("weight", "scales", "biases")}
    # Cast one tensor at a time so the stored and compute copies never coexist in full.
    loaded = []
    for name in list(weights):
        w = weights.pop(name)
        if name not in mapped and name not in unread:
            if mx.issubdtype(w.dtype, mx.floating) and not over_bf16:
                w = w.astype(dtype)
            read_tensor(ckpt, name, w)
        loaded.append((name, w))
    net.load_weights(loaded, strict=True)
    loaded.clear()  # the net holds them now: a layer the CPU paths replace below is freed as it goes
    if mkl:
        modules = dict(net.named_modules())
        mkl_bf16.adopt(net, float32=over_bf16,
                       mapped={id(modules[n.removesuffix(".weight")]): bits for n, bits in mapped.items()})
    elif quantized and cpu_quant.available():
        cpu_quant.adopt(net, kept)  # so is its CPU quantized matmul; the kernel's runs at memory speed
        if packable and not kept:  # (`describe` says so)
            object.__setattr__(net, "_packs_written", store.write(packable, dict(net.named_modules())))
    net.snapshots.store = states.store_for(ckpt.path, ckpt.weight_files)  # the left pad's state, on disk
    return Voxtral(net, tokenizer, audio, path.absolute())
