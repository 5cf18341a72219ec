"""Convert a model in any supported layout to the voxtral-mlx layout: cast, and optionally quantized.

The output directory holds `config.json` (the parsed configuration, the audio settings, the
format version and the quantization), `model.safetensors` (or shards and
`model.safetensors.index.json`) and a copy of `tekken.json`. Tensors are computed, written
and dropped one at a time, so memory stays near the largest tensor whatever the model size.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import AudioArgs
from .model import VoxtralRealtime, should_quantize
from .weights import (FORMAT, FORMAT_VERSION, WeightsError, find_checkpoint, load_network, parse_dtype,
                      resolve_model)

QUANT_BITS = (4, 6, 8)
GROUP_SIZES = (32, 64, 128)
MAX_SHARD_BYTES = 5 << 30
_SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
                       mx.uint8: "U8", mx.int32: "I32"}
_OUTPUT_FILE = re.compile(r"config\.json|tekken\.json|model\.safetensors\.index\.json|"
                          r"model(-\d{5}-of-\d{5})?\.safetensors")


@dataclass
class Conversion:
    """What `convert` wrote.

    Attributes:
        path: the output directory.
        source_layout: the layout of the source (see `voxtral_mlx.weights.LAYOUT_NAMES`).
        files: the weight files written.
        nbytes: bytes of tensor data.
        file_bytes: bytes of the weight files (tensor data and headers).
        parameters: weights of the unquantized network.
        dtype: the dtype of float tensors and quantization scales.
        bits, group_size: the quantization, or None.
        quantized: the quantized layers.
        seconds: wall time of the conversion.
    """

    path: Path
    source_layout: str
    files: list[str]
    nbytes: int
    file_bytes: int
    parameters: int
    dtype: str
    bits: int | None
    group_size: int | None
    quantized: list[str]
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.parameters


def convert(src: str | Path, out: str | Path, dtype: str = "bfloat16", q_bits: int | None = None,
            q_group_size: int = 64, force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Conversion:
    """Convert a model to the voxtral-mlx layout, which `voxtral_mlx.load` reads directly.

    Args:
        src: a model directory in any supported layout, or a Hugging Face repo id.
        out: the directory to write; it must not exist unless `force`.
        dtype: "bfloat16" (default), "float16" or "float32": float tensors and quantization scales.
        q_bits: 4, 6 or 8 to quantize every linear layer and the tied embedding whose input
            dimension is a multiple of `q_group_size` (the delay-conditioning MLP, norms and
            conv stem stay float); None (default) for no quantization.
        q_group_size: 32, 64 (default) or 128 weights per quantization scale.
        force: replace `out` if it is an empty directory or holds a voxtral-mlx model.
        max_shard_bytes: weights beyond this size are split into shards (default 5 GiB).
    """
    start = time.perf_counter()
    dt = parse_dtype(dtype)
    if q_bits is not None and (type(q_bits) is not int or q_bits not in QUANT_BITS):
        raise ValueError(f"q_bits {q_bits!r} is not supported; use 4, 6 or 8 (or None: no quantization)")
    if type(q_group_size) is not int or q_group_size not in GROUP_SIZES:
        raise ValueError(f"q_group_size {q_group_size!r} is not supported; use 32, 64 or 128")
    try:
        out = Path(out).expanduser()
    except RuntimeError:  # ~user of no user
        raise FileNotFoundError(f"{out}: no home directory for its ~") from None
    _remove_stale(out)
    _check_output(out, force)
    path = resolve_model(src)
    ckpt = find_checkpoint(path)
    net, weights, _, audio = load_network(ckpt)
    args = net.args
    tensors, quantized, parameters = _plan(net, weights, audio, dt, q_bits, q_group_size)
    del net, weights

    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        nbytes = sum(w.nbytes for w in tensors.values())
        files = _write_shards(tmp, tensors, max_shard_bytes)
        file_bytes = sum((tmp / f).stat().st_size for f in files)
        quantization = None if q_bits is None else {"bits": q_bits, "group_size": q_group_size, "mode": "affine"}
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": args.to_dict(),
                  "audio": audio.to_dict(), "dtype": _dtype_name(dt), "quantization": quantization,
                  "converted_from": ckpt.layout}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(path / "tekken.json", tmp / "tekken.json")
        _replace(out, tmp, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Conversion(path=out, source_layout=ckpt.layout, files=files, nbytes=nbytes,
                      file_bytes=file_bytes, parameters=parameters,
                      dtype=_dtype_name(dt), bits=q_bits, group_size=None if q_bits is None else q_group_size,
                      quantized=quantized, seconds=time.perf_counter() - start)


def _check_output(out: Path, force: bool):
    if not out.exists():
        return
    if not force:
        raise FileExistsError(f"{out} already exists; choose another directory, or replace it with --force")
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a model directory; it is left alone even with --force")
    names = sorted(f.name for f in out.iterdir())
    foreign = [n for n in names if not _OUTPUT_FILE.fullmatch(n) or not (out / n).is_file()]
    try:
        ours = json.loads((out / "config.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if foreign or (names and not ours):
        listing = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FileExistsError(f"{out} holds {listing}: not a model written by voxtral-mlx convert; --force "
                              "replaces only such a directory, or an empty one")


def _plan(net: VoxtralRealtime, weights: dict[str, mx.array], audio: AudioArgs, dtype: mx.Dtype,
          bits: int | None, group_size: int) -> tuple[dict[str, mx.array], list[str], int]:
    """The output tensors (lazy), the layers quantized, and the parameter count of the float network."""
    stored = dict(tree_flatten(net.leaf_modules(), is_leaf=nn.Module.is_module))
    target = VoxtralRealtime(net.args, audio)
    tensors, quantized, parameters = {}, [], 0
    for path, module in tree_flatten(target.leaf_modules(), is_leaf=nn.Module.is_module):
        params = dict(tree_flatten(module.parameters()))
        parameters += sum(p.size for p in params.values())
        source = stored[path]
        if isinstance(source, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            packed, scales = weights.pop(f"{path}.weight"), weights.pop(f"{path}.scales")
            biases = weights.pop(f"{path}.biases", None)
            same = (bits, group_size, "affine") == (source.bits, source.group_size, source.mode)
            if bits is not None and same and should_quantize(path, module, group_size):
                quantized.append(path)
                tensors.update({f"{path}.weight": packed, f"{path}.scales": scales.astype(dtype),
                                f"{path}.biases": biases.astype(dtype)})
                params.pop("weight")
            else:
                # In float32: dequantizing in the scales' half precision would round the weights again.
                weights[f"{path}.weight"] = mx.dequantize(
                    packed, scales.astype(mx.float32), None if biases is None else biases.astype(mx.float32),
                    source.group_size, source.bits, mode=source.mode)
        for key in params:
            name = f"{path}.{key}"
            w = weights.pop(name).astype(dtype)
            if key == "weight" and bits is not None and should_quantize(path, module, group_size):
                quantized.append(path)
                tensors[name], tensors[f"{path}.scales"], tensors[f"{path}.biases"] = mx.quantize(
                    w, group_size=group_size, bits=bits)
            else:
                tensors[name] = w
    return tensors, quantized, parameters


def _write_shards(directory: Path, tensors: dict[str, mx.array], max_shard_bytes: int) -> list[str]:
    shards, size = [[]], 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        _write_safetensors(directory / "model.safetensors", shards[0], tensors)
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, names in zip(files, shards):
        total += sum(tensors[n].nbytes for n in names)
        weight_map.update({n: file for n in names})
        _write_safetensors(directory / file, names, tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files


def _write_safetensors(file: Path, names: list[str], tensors: dict[str, mx.array]):
    """Write `names` (taken out of `tensors`) as one safetensors file, evaluating one tensor at a time."""
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for name in names:
        w = tensors[name]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[w.dtype], "shape": list(w.shape),
                        "data_offsets": [offset, offset + w.nbytes]}
        offset += w.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name in names:
            w = mx.contiguous(tensors.pop(name))
            try:
                mx.eval(w)
            except RuntimeError as e:
                raise WeightsError(f"cannot read or convert tensor {name} ({e})") from None
            f.write(memoryview(w))
            del w
            mx.clear_cache()


def _replace(out: Path, tmp: Path, force: bool):
    """Put the finished `tmp` in the place of `out`: a new directory is renamed, an old model
    (checked again: it may have appeared, or changed, during the conversion) is moved aside
    first and deleted last, so that one of the two is whole at every moment."""
    _check_output(out, force)
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale(out: Path):
    """Clear what conversions to `out` that were killed (not interrupted: they clean up) left
    beside it, named after their process, which no longer runs: a half-written model is
    deleted; an old model moved aside for its replacement goes back to `out` if that is missing."""
    for leftover in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, pid = leftover.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("converting", "replaced") or not pid.isdigit() or not leftover.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except OSError:  # a process of another user: alive
            continue
        if kind == "replaced" and not out.exists():
            leftover.rename(out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]
