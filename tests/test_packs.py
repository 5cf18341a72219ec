"""Quantized layers as the CPU kernel stores them, kept on disk (`packs`): later loads multiply
them in the file's mapping, bit for bit as packed, and a file that does not fit is packed again."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import AUDIO, forced_logits, synthetic

import voxtral_mlx
from voxtral_mlx import cpu_kernels, cpu_quant, packs
from voxtral_mlx.convert import convert
from voxtral_mlx.weights import mapped_tensors

needs_packed = pytest.mark.skipif(cpu_kernels.packed_kernel() is None,
                                  reason=f"the packed quantized kernel is not available: {cpu_kernels.packed_reason}")


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    """The tiny model at 4 bits (bfloat16 scales) and 8 bits (float32 scales), in groups of 64."""
    root = tmp_path_factory.mktemp("packs")
    return {4: convert(tiny_dir, root / "q4", q_bits=4, q_group_size=64).path,
            8: convert(tiny_dir, root / "q8", q_bits=8, q_group_size=64, dtype="float32").path}


def load(path, directory, monkeypatch):
    """A fresh load, as a new process makes, keeping its packed layers in `directory`."""
    monkeypatch.setenv(packs.ENV, str(directory))
    return voxtral_mlx.load(path)


def layers(model) -> dict:
    return {p: m for p, m in model.net.named_modules() if isinstance(m, (cpu_quant.Linear, cpu_quant.Embedding))}


def in_a_file_mapping(a: np.ndarray) -> bool:
    while a is not None and not isinstance(a, np.memmap):
        a = a.base if isinstance(a.base, np.ndarray) else None
    return a is not None


def files(directory):
    return sorted(directory.glob("*.safetensors"))


@needs_packed
@pytest.mark.parametrize("bits", [4, 8])
def test_a_later_load_multiplies_the_kept_layers_in_the_files_mapping_bit_for_bit(quantized, bits, tmp_path,
                                                                                   monkeypatch):
    directory = tmp_path / "packed"
    first = load(quantized[bits], directory, monkeypatch)
    assert len(files(directory)) == 1 and not any(m._mapped for m in layers(first).values())
    second = load(quantized[bits], directory, monkeypatch)
    packed, kept = layers(first), layers(second)
    assert kept.keys() == packed.keys() and len(kept) == 2 + 7 * 2 + 7 * 2 + 1  # adapter, encoder, decoder, head
    for path, m in kept.items():
        p = packed[path]
        assert m._mapped and m._packed and in_a_file_mapping(m._q.weight) and not in_a_file_mapping(p._q.weight)
        assert m._q.weight.ctypes.data % packs.ALIGN == 0  # (the file's data starts on a cache line)
        for a, b in zip(m._q, p._q):
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and np.array_equal(a, b), path
            else:
                assert a == b, path
    kernel = "AMX" if cpu_kernels.packed_kernel() == "AMX" else "AVX-512 VNNI"
    assert cpu_quant.describe(second.net) == (f"{bits}-bit products through the {kernel} kernel (its layers in the "
                                              "mapping of the copy kept on disk), float32 elsewhere")
    assert cpu_quant.describe(first.net) == (f"{bits}-bit products through the {kernel} kernel (its layers kept on "
                                             "disk for later loads), float32 elsewhere")
    # bfloat16 scales kept as their bits at 4 bits (the checkpoint's), float32 at 8
    assert {m._q.scales.dtype for m in kept.values()} == {np.dtype(np.uint16 if bits == 4 else np.float32)}
    # The same logits and tokens as a load that packs in memory.
    monkeypatch.setenv(packs.ENV, "off")
    fresh = voxtral_mlx.load(quantized[bits])
    assert not any(m._mapped for m in layers(fresh).values()) and len(files(directory)) == 1
    audio = synthetic(3.0, seed=4)
    tokens = fresh.transcribe(audio, speculate=0).tokens
    assert len(set(tokens)) > 3
    assert second.transcribe(audio, speculate=0).tokens == tokens
    assert second.transcribe([audio, synthetic(1.0, seed=1)], batch_size=2)[0].tokens == tokens
    assert np.array_equal(forced_logits(second, audio, tokens), forced_logits(fresh, audio, tokens))


@needs_packed
def test_a_load_from_the_file_reads_no_weight(quantized, tmp_path, monkeypatch):
    directory = tmp_path / "packed"
    load(quantized[8], directory, monkeypatch)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = load(quantized[8], directory, monkeypatch)
    peak = mx.get_peak_memory() - before
    weights = sum(m.weight.nbytes for m in layers(model).values())
    held = sum(p.nbytes for _, p in tree_flatten(model.net.parameters()))
    assert all(m._mapped for m in layers(model).values()) and weights > 0.5 * held
    assert peak < held - weights / 2, (peak, held, weights)  # (reading the weights would take more)


@needs_packed
def test_the_file_holds_the_packed_layers_and_their_shapes(quantized, tmp_path, monkeypatch):
    directory = tmp_path / "packed"
    model = load(quantized[4], directory, monkeypatch)
    (path,) = files(directory)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    layout = json.loads(metadata["layout"])
    assert layout["format"] == packs.FORMAT and path.name == layout["model"][:40] + ".safetensors"
    assert layout["layers"] == cpu_quant.packable(voxtral_mlx.weights.load_network(
        voxtral_mlx.weights.find_checkpoint(quantized[4]))[0])
    assert len(arrays) == 3 * len(layout["layers"])
    for name, m in layers(model).items():
        n, k, bits, group = layout["layers"][name]
        assert (n, bits, group) == (m._q.n, 4, 64) and k == m._q.k
        assert np.array_equal(np.array(arrays[f"{name}.weight"]), m._q.weight)
        assert arrays[f"{name}.scales"].dtype == mx.uint16


def cut_short(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4096)


def rewrite_layout(path, change):
    """The file with its header's layout changed by `change` (same length, padded with spaces)."""
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        layout = json.loads(header["__metadata__"]["layout"])
        change(layout)
        header["__metadata__"]["layout"] = json.dumps(layout)
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= size
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


@needs_packed
@pytest.mark.parametrize("damage", ["cut short", "other layers", "other format", "not safetensors"])
def test_a_kept_file_that_does_not_fit_is_packed_again_and_replaced(quantized, damage, tmp_path, monkeypatch):
    directory = tmp_path / "packed"
    load(quantized[4], directory, monkeypatch)
    (path,) = files(directory)
    good = path.read_bytes()
    if damage == "cut short":
        cut_short(path)
    elif damage == "other layers":
        rewrite_layout(path, lambda layout: layout["layers"].popitem())
    elif damage == "other format":
        rewrite_layout(path, lambda layout: layout.update(format=packs.FORMAT + 1))
    else:
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    model = load(quantized[4], directory, monkeypatch)
    assert not any(m._mapped for m in layers(model).values())
    assert files(directory) == [path] and path.read_bytes() == good
    assert all(m._mapped for m in layers(load(quantized[4], directory, monkeypatch)).values())


@needs_packed
def test_a_changed_model_gets_a_file_of_its_own_and_the_two_latest_stay(quantized, tiny_dir, tmp_path, monkeypatch):
    directory = tmp_path / "packed"
    load(quantized[4], directory, monkeypatch)
    load(quantized[8], directory, monkeypatch)
    assert len(files(directory)) == packs.LIMIT == 2
    (quantized[4] / "config.json").touch()  # a model file changed since: its layers are packed again
    os.utime(quantized[4] / "config.json", ns=(1, 1))
    model = load(quantized[4], directory, monkeypatch)
    assert not any(m._mapped for m in layers(model).values())
    names = files(directory)
    assert len(names) == 2 and all(m._mapped for m in layers(load(quantized[8], directory, monkeypatch)).values())
    assert all(m._mapped for m in layers(load(quantized[4], directory, monkeypatch)).values())
    assert files(directory) == names


@needs_packed
def test_off_or_an_unwritable_directory_packs_in_memory(quantized, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(packs.ENV, "off")
    model = voxtral_mlx.load(quantized[4])
    assert all(m._packed and not m._mapped for m in layers(model).values())
    assert not (tmp_path / "cache" / "voxtral-mlx" / "packed").exists()
    blocked = tmp_path / "a file"
    blocked.write_text("")
    expected = model.transcribe(synthetic(1.5, seed=2), speculate=0).tokens
    for directory in (blocked, blocked / "below"):
        model = load(quantized[4], directory, monkeypatch)
        assert all(m._packed and not m._mapped for m in layers(model).values())
        assert "kept on disk" not in cpu_quant.describe(model.net)
        assert model.transcribe(synthetic(1.5, seed=2), speculate=0).tokens == expected
    assert blocked.read_text() == ""


@needs_packed
def test_a_directory_that_is_only_read_is_still_read(quantized, tmp_path, monkeypatch):
    directory = tmp_path / "packed"
    load(quantized[4], directory, monkeypatch)
    (path,) = files(directory)
    before = path.stat().st_mtime_ns

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "utime", refused)
    model = load(quantized[4], directory, monkeypatch)
    assert all(m._mapped for m in layers(model).values()) and path.stat().st_mtime_ns == before


@needs_packed
def test_the_default_directory_is_the_user_cache(quantized, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(packs.ENV, "")
    voxtral_mlx.load(quantized[8])
    assert len(files(tmp_path / "cache" / "voxtral-mlx" / "packed")) == 1


def test_mapped_tensors_are_views_of_the_file_in_their_dtype(tmp_path):
    path = tmp_path / "t.safetensors"
    # (MLX orders a file's tensors as it likes, without padding: sizes of 4s keep the float32 aligned)
    a, b, c = np.arange(12, dtype=np.uint8).reshape(3, 4), np.linspace(0, 1, 6, dtype=np.float32), np.ones(4, np.int8)
    mx.save_safetensors(str(path), {"a": mx.array(a), "b": mx.array(b), "c": mx.array(c),
                                    "h": mx.array(b).astype(mx.bfloat16)})
    got = mapped_tensors(path, ["a", "b", "c", "h", "missing"])
    assert sorted(got) == ["a", "b", "h"]  # int8 is not one of the mapped dtypes
    assert got["a"].dtype == np.uint8 and np.array_equal(got["a"], a) and in_a_file_mapping(got["a"])
    assert got["b"].dtype == np.float32 and np.array_equal(got["b"], b)
    assert got["h"].dtype == np.uint16 and np.array_equal((got["h"].astype(np.uint32) << 16).view(np.float32),
                                                          np.array(mx.array(b).astype(mx.bfloat16).astype(mx.float32)))
    assert sorted(mapped_tensors(path, ["a", "b", "h"], ("U8",))) == ["a"]
    assert mapped_tensors(tmp_path / "none.safetensors", ["a"]) == {}


@needs_packed
def test_the_command_line_multiplies_the_layers_its_first_run_kept(quantized, tmp_path):
    script = Path(sys.executable).parent / "voxtral-mlx"
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{packs.ENV: str(tmp_path)})

    def run():
        done = subprocess.run([str(script), "transcribe", str(AUDIO / "jfk.wav"), "--model", str(quantized[4]), "-v"],
                              stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=120, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr

    text, said = run()
    (path,) = files(tmp_path)
    written = path.stat()
    assert text.strip() and "(its layers kept on disk for later loads)" in said
    again, said = run()
    assert again == text and "(its layers in the mapping of the copy kept on disk)" in said
    assert path.stat().st_ino == written.st_ino and files(tmp_path) == [path]  # read, not written again


@pytest.mark.skipif(not cpu_quant.available(), reason=f"no kernel library: {cpu_kernels.reason}")
def test_where_no_packed_kernel_multiplies_nothing_is_kept(quantized, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "q_packed_fits", lambda *a: False)  # CPUs without AMX or VNNI
    model = load(quantized[4], tmp_path / "packed", monkeypatch)
    assert layers(model) and not any(m._packed or m._mapped for m in layers(model).values())
    assert not (tmp_path / "packed").exists()
