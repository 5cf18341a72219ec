"""Finding a model directory, reading its configuration and loading its weights."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import AudioArgs, ConfigError, ModelArgs
from .model import VoxtralRealtime
from .tokenizer import Tekken
from .transcribe import Voxtral

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"
MODEL_FILES = ("params.json", "consolidated.safetensors", "tekken.json")
DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """No model at the given path or repo id; the message says how to get one."""


class WeightsError(ValueError):
    """The weights file is unreadable or does not match `params.json`."""


def _get_instructions(repo: str) -> str:
    files = " ".join(MODEL_FILES)
    return (f"download it with `hf download {repo} {files} --local-dir DIR` and pass that "
            f"directory (voxtral-mlx --model DIR, or voxtral_mlx.load(DIR))")


def resolve_model(path_or_repo: str | Path = DEFAULT_MODEL) -> Path:
    """A local model directory, or a Hugging Face repo id fetched (three files) into the hub cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        missing = [f for f in MODEL_FILES if not (path / f).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{path} is not a Voxtral Realtime model directory: {', '.join(missing)} missing "
                f"(it needs {', '.join(MODEL_FILES)}); to get the official model, {_get_instructions(DEFAULT_MODEL)}"
            )
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the directory that holds {', '.join(MODEL_FILES)}")
    repo = str(path_or_repo)
    if not _REPO_ID.match(repo) or repo.startswith((".", "~")):
        raise ModelNotFoundError(f"{repo}: no such model directory (nor a Hugging Face repo id like {DEFAULT_MODEL})")
    return _download(repo)


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(repo, allow_patterns=list(MODEL_FILES)))
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
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); {_get_instructions(repo)}"
        ) from None
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{repo} has no {', '.join(missing)}: its download is incomplete, or it is not a Voxtral Realtime "
            f"checkpoint in the official layout; {_get_instructions(repo)}"
        )
    return path


def default_dtype() -> mx.Dtype:
    """float32 on the CPU (half-precision matmuls are slow loops there), bfloat16 on a GPU."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def blas_backend() -> str:
    """What serves MLX's CPU matmuls: a preloaded OpenBLAS/MKL/BLIS, or the mlx-cpu wheel's reference BLAS."""
    if sys.platform == "darwin":
        return "Accelerate"
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return "unknown"
    for lib in sorted(libs):
        if lib in preload and any(name in lib for name in ("openblas", "mkl", "blis")):
            return f"{Path(lib).parent.name}/{Path(lib).name} (preloaded)"
    return "reference BLAS of the mlx-cpu wheel"


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


def check_weights(net: VoxtralRealtime, weights: dict[str, mx.array], raw_shapes: dict[str, tuple],
                  source: str):
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
            problems.append(f"tensor {name} has shape {list(raw_shapes[name])}, but params.json implies "
                            f"{_checkpoint_shape(expected[name].shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise WeightsError(f"{source} does not match params.json: {'; '.join(problems[:5])}{more}")


def _checkpoint_shape(shape) -> list[int]:
    # Conv kernels are [out, kernel, in] in MLX and [out, in, kernel] in the checkpoint.
    return [shape[0], shape[2], shape[1]] if len(shape) == 3 else list(shape)


def load_config(path: Path) -> tuple[ModelArgs, Tekken, AudioArgs]:
    """The network, tokenizer and audio settings of a model directory, checked against each other."""
    try:
        params = json.loads((path / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path / 'params.json'}: {e}") from None
    args = ModelArgs.from_params(params)
    tokenizer = Tekken.from_file(path / "tekken.json")
    if tokenizer.audio is None:
        raise ConfigError(f"{path / 'tekken.json'} has no audio section: not a Voxtral Realtime tokenizer")
    audio = AudioArgs.from_files(tokenizer.audio, args)
    if tokenizer.vocab_size != args.decoder.vocab_size:
        raise ConfigError(f"tekken.json has {tokenizer.vocab_size} tokens, params.json vocab_size is "
                          f"{args.decoder.vocab_size}")
    return args, tokenizer, audio


def load(path_or_repo: str | Path = DEFAULT_MODEL, dtype: str | mx.Dtype | None = None) -> Voxtral:
    """Load Voxtral Realtime.

    Args:
        path_or_repo: a directory with params.json, consolidated.safetensors and tekken.json,
            or a Hugging Face repo id (default: the official model; only those three files
            are downloaded, into the Hugging Face cache).
        dtype: compute dtype: "float32" (default on CPU), "bfloat16" (default on GPU) or "float16".
            The weights stay in their stored dtype on disk and are cast while loading.
    """
    path = resolve_model(path_or_repo)
    dtype = parse_dtype(dtype)
    args, tokenizer, audio = load_config(path)

    net = VoxtralRealtime(args, audio)
    source = path / "consolidated.safetensors"
    raw = read_safetensors(source)
    raw_shapes = {name: tuple(w.shape) for name, w in raw.items()}
    weights = net.sanitize(raw)
    del raw
    check_weights(net, weights, raw_shapes, source.name)
    # Cast one tensor at a time so the stored and compute copies never coexist in full.
    loaded = []
    for name in list(weights):
        w = weights.pop(name).astype(dtype)
        try:
            mx.eval(w)
        except RuntimeError as e:
            raise WeightsError(f"{source}: cannot read tensor {name} ({e})") from None
        loaded.append((name, w))
    net.load_weights(loaded, strict=True)
    return Voxtral(net, tokenizer, audio, path)
