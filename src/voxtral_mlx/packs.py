"""A quantized model's layers as the CPU kernel stores them, kept on disk for later loads.

Where the packed kernel multiplies a quantized model (`cpu_quant`: AMX or AVX-512 VNNI), each
layer is reordered for it at load (`cpu_kernels.q_pack`). Reading an 8-bit 4B model into new
memory and reordering it took 7-27 s of each load on a 2-core Linux VM, most of it the first
touch of 4.7 GB of fresh memory. `Store` writes a model's packed layers into one safetensors
file on its first load (4-6 s longer, for the 4B model there), named by a digest of what the
packing depends on (`states.fingerprint`: the model's files, the code, the libraries, the CPU);
later loads multiply them in a read-only mapping of that file: nothing is read at load, and
their memory is the system's file cache, which the processes that use the model share and the
next one finds filled. The `LIMIT` most recently used files stay in
`$XDG_CACHE_HOME/voxtral-mlx/packed` (else ~/.cache/voxtral-mlx/packed), each about the size of
its model; `VOXTRAL_MLX_PACKS=off` packs in memory at every load, and a directory there keeps
them there. A layer read back multiplies as the one packed, bit for bit.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .cpu_kernels import cache_dir
from .states import fingerprint, used, write_kept

ENV = "VOXTRAL_MLX_PACKS"
FORMAT = 1  # of the files: a change of layout makes earlier files unread
LIMIT = 2
ALIGN = 64  # bytes: where the weights start in the file (a cache line)
DTYPES = {np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16", np.dtype(np.float32): "F32"}


class Kept(NamedTuple):
    """A layer read back: its weight (lazy, never evaluated) and the same bytes in the file's
    mapping, its scales and biases (evaluated: a few percent of the bytes)."""

    weight: mx.array
    mapped: np.ndarray
    scales: mx.array
    biases: mx.array


class Store:
    """The packed layers of one model on disk (see the module)."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.path = self.directory / (fingerprint[:40] + ".safetensors")

    def read(self, layers: dict[str, list[int]]) -> dict[str, Kept]:
        """The layers kept for this model by path, where the file holds every one of `layers`
        (path -> [rows, columns, bits, group size]) as packed for the kernel; else {}."""
        from .weights import mapped_tensors  # (weights imports this module)

        try:
            arrays, metadata = mx.load(str(self.path), return_metadata=True)
            layout = json.loads(metadata["layout"])
            if layout["format"] != FORMAT or layout["model"] != self.fingerprint or layout["layers"] != layers:
                return {}
            mapped = mapped_tensors(self.path, [f"{path}.weight" for path in layers], ("U8",))
            kept = {}
            for path, (n, k, bits, group) in layers.items():
                w, s, b = (arrays[f"{path}.{part}"] for part in ("weight", "scales", "biases"))
                blocks = -(-n // 16)
                if (w.shape != (blocks, 16 * k * bits // 8) or f"{path}.weight" not in mapped
                        or s.shape != (blocks, k // group, 16) or b.shape != s.shape
                        or s.dtype not in (mx.uint16, mx.float32) or b.dtype != s.dtype):
                    return {}
                kept[path] = Kept(w, mapped[f"{path}.weight"], s, b)
            mx.eval([(k.scales, k.biases) for k in kept.values()])
            used(self.path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            return {}
        return kept

    def write(self, layers: dict[str, list[int]], modules: dict[str, object]) -> bool:
        """Keep the packed layers `modules` (by path; `layers` as `read` takes it) for later loads."""
        arrays = {f"{path}.{part}": getattr(modules[path]._q, part) for part in ("weight", "scales", "biases")
                  for path in layers}  # the weights first: each a whole number of ALIGN bytes
        layout = {"format": FORMAT, "model": self.fingerprint, "layers": layers}
        return write_kept(self.path, lambda file: write_aligned(file, arrays, layout), LIMIT)


def write_aligned(file: str, arrays: dict[str, np.ndarray], layout: dict):
    """`arrays` as a safetensors file (metadata "layout": `layout`) whose data starts ALIGN bytes
    into it (the header padded with spaces), in their order."""
    header, offset = {"__metadata__": {"layout": json.dumps(layout)}}, 0
    for name, a in arrays.items():
        header[name] = {"dtype": DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for a in arrays.values():
            f.write(np.ascontiguousarray(a).data)


def store_for(model_dir: Path, weight_files: list[Path] = ()) -> Store | None:
    """The store for the packed layers of the model in `model_dir` (`VOXTRAL_MLX_PACKS`: off, or
    a directory), or None."""
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in ("off", "0", "no", "false"):
        return None
    return Store(Path(choice) if choice else cache_dir() / "packed", fingerprint(model_dir, weight_files))
