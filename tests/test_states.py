"""The left pad's state kept on disk (`states`): read back bit for bit by later loads, named by
what its numbers depend on, and never in the way where it cannot be read or written."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from conftest import AUDIO, synthetic

import voxtral_mlx
from voxtral_mlx import states


def load(path, directory, monkeypatch):
    """A fresh load, as a new process makes, with its states in `directory`."""
    monkeypatch.setenv(states.ENV, str(directory))
    return voxtral_mlx.load(path)


def as_numpy(snapshot):
    """A state as numpy arrays: tails, then (offset, keys, values) per ring."""
    rings = [(o, np.array(k), np.array(v)) for o, k, v in snapshot.encoder + snapshot.decoder]
    return [np.array(t) for t in snapshot.tails], rings


def kept(model):
    """The model's one state in memory (`as_numpy`)."""
    (snapshot,) = model.net.snapshots._items.values()
    return as_numpy(snapshot)


def assert_same_state(a, b):
    (tails_a, rings_a), (tails_b, rings_b) = a, b
    assert len(tails_a) == len(tails_b) and len(rings_a) == len(rings_b)
    for x, y in zip(tails_a, tails_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    for (oa, ka, va), (ob, kb, vb) in zip(rings_a, rings_b):
        assert oa == ob and ka.dtype == kb.dtype
        assert np.array_equal(ka, kb) and np.array_equal(va, vb)


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def test_a_later_load_reads_the_state_bit_for_bit(tiny_dir, tmp_path, monkeypatch):
    directory = tmp_path / "states"
    first = load(tiny_dir, directory, monkeypatch)
    first.prepare()
    assert first.net.snapshots.read == 0 and len(files(directory)) == 1
    second = load(tiny_dir, directory, monkeypatch)
    second.prepare()
    assert second.net.snapshots.read == 1 and len(files(directory)) == 1
    assert_same_state(kept(first), kept(second))
    # The tokens of a session from the read state are those of one that computed it.
    monkeypatch.setenv(states.ENV, "off")
    computing = voxtral_mlx.load(tiny_dir)
    assert computing.net.snapshots.store is None
    audio = synthetic(3.0, seed=4)
    expected = computing.transcribe(audio, speculate=0).tokens
    assert computing.net.snapshots.read == 0
    assert second.transcribe(audio, speculate=0).tokens == expected
    assert len(set(expected)) > 3


def test_a_state_in_a_directory_that_is_only_read_is_still_read(tiny_dir, tmp_path, monkeypatch):
    directory = tmp_path / "states"
    load(tiny_dir, directory, monkeypatch).prepare()

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "utime", refused)
    model = load(tiny_dir, directory, monkeypatch)
    model.prepare()
    assert model.net.snapshots.read == 1 and len(files(directory)) == 1


def test_each_delay_has_its_own_state(tiny_dir, tmp_path, monkeypatch):
    directory = tmp_path / "states"
    model = load(tiny_dir, directory, monkeypatch)
    model.prepare(delay_ms=480)
    model.prepare(delay_ms=160)
    assert len(files(directory)) == 2
    again = load(tiny_dir, directory, monkeypatch)
    again.prepare(delay_ms=160)
    assert again.net.snapshots.read == 1


def test_the_name_changes_with_the_model_files_the_code_and_the_kernels(tiny_dir, tmp_path, monkeypatch):
    base = states.fingerprint(tiny_dir)
    assert states.fingerprint(tiny_dir) == base
    copy = tmp_path / "model"
    copy.mkdir()
    for path in tiny_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert states.fingerprint(copy) != base  # another directory
    copied = states.fingerprint(copy)
    weights = next(copy.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert states.fingerprint(copy) != copied  # a weight file written again
    monkeypatch.setenv("VOXTRAL_MLX_CPU_KERNELS", "off")
    assert states.fingerprint(tiny_dir) != base  # other kernels
    monkeypatch.delenv("VOXTRAL_MLX_CPU_KERNELS")
    monkeypatch.setenv(states.ENV, str(tmp_path))
    assert states.fingerprint(tiny_dir) == base  # where states are kept does not change them
    monkeypatch.setattr(states, "_code_digest", lambda: "another version")
    assert states.fingerprint(tiny_dir) != base


def test_a_damaged_file_is_computed_and_written_again(tiny_dir, tmp_path, monkeypatch):
    directory = tmp_path / "states"
    first = load(tiny_dir, directory, monkeypatch)
    first.prepare()
    (path,) = files(directory)
    path.write_bytes(path.read_bytes()[:1000])
    second = load(tiny_dir, directory, monkeypatch)
    second.prepare()
    assert second.net.snapshots.read == 0
    assert_same_state(kept(first), kept(second))
    third = load(tiny_dir, directory, monkeypatch)
    third.prepare()
    assert third.net.snapshots.read == 1


def test_a_file_of_another_key_or_model_is_not_read(tiny_dir, tmp_path, monkeypatch):
    model = load(tiny_dir, tmp_path, monkeypatch)
    model.prepare()
    store = model.net.snapshots.store
    (key,) = model.net.snapshots._items
    other = (*key[:-1], "another path")
    os.replace(store.path(key), store.path(other))
    assert store.read(other) is None
    another_model = states.Store(tmp_path, "another model")
    os.replace(store.path(other), another_model.path(key))
    assert another_model.read(key) is None
    os.replace(another_model.path(key), store.path(key))
    assert_same_state(kept(model), as_numpy(store.read(key)))


def test_a_directory_that_cannot_be_written_keeps_the_state_in_memory(tiny_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    model = load(tiny_dir, blocker / "states", monkeypatch)
    model.prepare()
    assert model.net.snapshots.read == 0 and model.net.snapshots.nbytes > 0
    assert not (blocker / "states").exists()


def test_an_install_without_kernel_sources_keeps_states(tiny_dir, tmp_path, monkeypatch):
    def missing():
        raise FileNotFoundError("Kernel sources not found")

    base = states.fingerprint(tiny_dir)
    monkeypatch.setattr(states, "kernel_dir", missing)
    assert states.fingerprint(tiny_dir) != base
    monkeypatch.setenv(states.ENV, str(tmp_path))
    assert states.store_for(tiny_dir).directory == tmp_path


def test_off_keeps_states_in_memory_only(tiny_dir, tmp_path, monkeypatch):
    for value in ("off", "0", "OFF"):
        monkeypatch.setenv(states.ENV, value)
        assert states.store_for(tiny_dir) is None
    monkeypatch.delenv(states.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert states.store_for(tiny_dir).directory == tmp_path / "voxtral-mlx" / "states"


def test_the_most_recently_used_files_are_kept(tiny_dir, tmp_path, monkeypatch):
    model = load(tiny_dir, tmp_path, monkeypatch)
    model.prepare()
    (key,) = model.net.snapshots._items
    (snapshot,) = model.net.snapshots._items.values()
    store = states.Store(tmp_path / "few", "fingerprint")
    keys = [(*key[:-1], i) for i in range(states.Store.LIMIT + 1)]
    for i, k in enumerate(keys[:-1]):
        store.write(k, snapshot)
        os.utime(store.path(k), ns=(10**9 * (i + 1),) * 2)
    assert store.read(keys[0]) is not None  # read: now the most recent
    store.write(keys[-1], snapshot)
    remaining = set(files(store.directory))
    assert len(remaining) == states.Store.LIMIT and store.path(keys[1]) not in remaining
    assert {store.path(k) for k in [keys[0], *keys[2:]]} == remaining
    assert not list(store.directory.glob(".writing-*"))


def test_the_command_line_reads_the_state_that_its_first_run_kept(tiny_dir, tmp_path):
    script = Path(sys.executable).parent / "voxtral-mlx"
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{states.ENV: str(tmp_path)})

    def run():
        done = subprocess.run([str(script), "transcribe", str(AUDIO / "jfk.wav"), "--model", str(tiny_dir)],
                              stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout

    first = run()
    (path,) = files(tmp_path)
    written = path.stat()
    os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns - 10**9))
    assert run() == first and first.strip()
    read = path.stat()  # read in place (a state computed again is a new file)
    assert read.st_ino == written.st_ino and read.st_mtime_ns > written.st_mtime_ns - 10**9
    arrays = mx.load(str(path))
    assert any(name.startswith("encoder.") for name in arrays) and any(name.startswith("decoder.") for name in arrays)

