"""The state after the left pad, kept on disk for later processes.

Every session starts with tokens that hear only the left pad's silence (31 of the 32); their
state (the encoder's and decoder's keys and values, the conv stem's tails) is the same for
every recording at a delay, so a model computes it once, on its first session, and copies it
into the others (`streaming`, `model.Snapshots`). For the 4B model that first computation took
2.4-4.3 s of every process on a 2-core CPU: of each `voxtral-mlx transcribe`, and before `mic`
or the server listens. `Store` keeps the state in a file (72 MB for the 4B model, read in 10-20
ms) named by a digest of what its numbers depend on: the model's files (names, sizes,
modification times), this package's code and kernels, MLX's and numpy's versions, the BLAS,
the CPU, the environment variables that choose kernels, BLAS and threads, and the state's key
(delay, device, dtype, compute path).
A state read back is the one computed, bit for bit. The `LIMIT` most recently used files stay
in `$XDG_CACHE_HOME/voxtral-mlx/states` (else ~/.cache/voxtral-mlx/states);
`VOXTRAL_MLX_STATES=off` keeps states in memory only, and a directory there keeps them there.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from .cpu_kernels import cache_dir, cpu_flags
from .kernels import kernel_dir
from .model import CachesSnapshot

ENV = "VOXTRAL_MLX_STATES"
FORMAT = 1  # of the files: a change of layout makes earlier files unread
# Environment variables that change which kernels, BLAS or threads compute a state.
ENV_PREFIXES = ("VOXTRAL_MLX_", "MKL_", "OMP_", "OPENBLAS_")
UNRELATED = (ENV, "VOXTRAL_MLX_PACKS", "VOXTRAL_MLX_API_KEY")


def _code_digest() -> str:
    """A digest of this package's Python files and kernel sources."""
    digest = hashlib.sha256()
    try:
        kernels = list(kernel_dir().iterdir())
    except OSError:  # (an install without them: the CPU paths that need them say so when used)
        kernels = []
    for path in sorted([*Path(__file__).parent.glob("*.py"), *kernels]):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    from .weights import blas_backend  # (weights imports this module)

    return {"cpu": model, "flags": sorted(cpu_flags()), "machine": platform.machine(), "cores": os.cpu_count(),
            "system": platform.system(), "python": platform.python_version(), "mlx": mx.__version__,
            "numpy": np.__version__, "blas": blas_backend()}


def fingerprint(model_dir: Path, weight_files: list[Path] = ()) -> str:
    """A digest of what a model's states depend on besides their key: the model directory's
    files (and `weight_files`), the code, the libraries, the machine and the environment."""
    files = []
    for path in sorted({*Path(model_dir).iterdir(), *map(Path, weight_files)}):
        try:
            stat = path.stat()  # through symbolic links (the Hugging Face cache's)
        except OSError:
            continue
        if path.is_file() and not path.name.startswith("."):
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
    environment = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and k not in UNRELATED}
    record = {"format": FORMAT, "model": str(Path(model_dir).resolve()), "files": files, "code": _code_digest(),
              "machine": _machine(), "environment": environment}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class Store:
    """States of one model on disk (see the module): `read` and `write` by key."""

    LIMIT = 4
    SUFFIX = ".safetensors"

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint

    def path(self, key: tuple) -> Path:
        name = hashlib.sha256(f"{self.fingerprint}\0{key!r}".encode()).hexdigest()[:40]
        return self.directory / (name + self.SUFFIX)

    def read(self, key: tuple) -> CachesSnapshot | None:
        """The state kept for `key`, or None (none kept, or a file that cannot be read)."""
        path = self.path(key)
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
            layout = json.loads(metadata["layout"])
            if layout["key"] != repr(key) or layout["model"] != self.fingerprint or layout["format"] != FORMAT:
                return None
            parts = {part: [(offset, arrays[f"{part}.{i}.keys"], arrays[f"{part}.{i}.values"])
                            for i, offset in enumerate(layout[part])] for part in ("encoder", "decoder")}
            snapshot = CachesSnapshot([arrays[f"tails.{i}"] for i in range(layout["tails"])], **parts)
            mx.eval(snapshot.tails, [a for _, k, v in snapshot.encoder + snapshot.decoder for a in (k, v)])
            used(path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            return None
        return snapshot

    def write(self, key: tuple, snapshot: CachesSnapshot) -> None:
        """Keep `snapshot` for `key` (at most `LIMIT` files in the directory); a directory that
        cannot be written leaves the state in memory only."""
        arrays = {f"tails.{i}": a for i, a in enumerate(snapshot.tails)}
        for part in ("encoder", "decoder"):
            for i, (_, keys, values) in enumerate(getattr(snapshot, part)):
                arrays[f"{part}.{i}.keys"], arrays[f"{part}.{i}.values"] = keys, values
        layout = {"format": FORMAT, "model": self.fingerprint, "key": repr(key), "tails": len(snapshot.tails),
                  "encoder": [offset for offset, _, _ in snapshot.encoder],
                  "decoder": [offset for offset, _, _ in snapshot.decoder]}
        metadata = {"layout": json.dumps(layout)}
        write_kept(self.path(key), lambda file: mx.save_safetensors(file, arrays, metadata=metadata), self.LIMIT)


def used(path: Path):
    """Mark a kept file recently used (the most recent stay), where it may be changed: one in a
    directory that is only read is still read."""
    try:
        os.utime(path)
    except OSError:
        pass


def write_kept(path: Path, write: Callable[[str], None], limit: int) -> bool:
    """Have `write` write the file `path` (given a temporary file's name, so that no reader
    finds it half written) and keep at most the `limit` most recently used files of its suffix
    in its directory. False where the directory cannot be written (or the disk is full): the
    caller keeps what it has in memory."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".writing-", suffix=path.suffix, dir=directory)
        os.close(fd)
        try:
            write(temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        kept = sorted((p for p in directory.glob("*" + path.suffix) if not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in kept[limit:]:
            old.unlink(missing_ok=True)
    except (OSError, RuntimeError, ValueError):
        return False
    return True


def store_for(model_dir: Path, weight_files: list[Path] = ()) -> Store | None:
    """The store for the states of the model in `model_dir` (`VOXTRAL_MLX_STATES`: off, or a
    directory), or None."""
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in ("off", "0", "no", "false"):
        return None
    return Store(Path(choice) if choice else cache_dir() / "states", fingerprint(model_dir, weight_files))
