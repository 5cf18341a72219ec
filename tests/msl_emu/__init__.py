"""Runs `mx.fast.metal_kernel` bodies on a CPU: MSL type-checked and executed with clang.

`metal_kernel(...)` takes the arguments of `mx.fast.metal_kernel` and returns a callable with
the same call interface, so the host code that launches a Metal kernel runs unchanged on
Linux with this stand-in. A call wraps the body in the signature MLX generates (inputs of
fewer than 8 elements in `constant`, the others in `device`; `name_shape`, `name_strides`,
`name_ndim` and thread attributes only when the body mentions them; the template arguments),
compiles it as C++20 against `shim/` (a small <metal_stdlib>) and runs the grid.

What is checked: Metal's address spaces (a store through `const device`, a `device` pointer
where a `threadgroup` one is expected), types and template instantiation; at run time,
barriers and SIMD operations that not every thread reaches (reported as a deadlock instead of
hanging), and reads of memory nobody wrote: threadgroup arrays and outputs start as 0xFF
bytes, NaN for floats. What is not: Metal's own compiler (only the MSL subset in shim/
exists), its fast-math, out-of-bounds accesses, races within a threadgroup (its threads take
turns at barriers), and speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

SHIM = Path(__file__).parent / "shim"
CLANG = os.environ.get("MSL_EMU_CLANG", "clang++-19")
FLAGS = ["-x", "c++", "-std=c++20", "-Wall", "-Werror", "-Wno-unknown-attributes", "-I", str(SHIM)]
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in the constant address space

# mlx dtype -> (MLX's Metal type name, numpy type that holds its bytes)
TYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.int32: ("int32_t", np.int32),
    mx.uint32: ("uint32_t", np.uint32),
    mx.int64: ("int64_t", np.int64),
    mx.uint64: ("uint64_t", np.uint64),
    mx.int16: ("int16_t", np.int16),
    mx.uint16: ("uint16_t", np.uint16),
    mx.int8: ("int8_t", np.int8),
    mx.uint8: ("uint8_t", np.uint8),
    mx.bool_: ("bool", np.bool_),
}
NUMPY_TO_MX = {np.dtype(np.float32): mx.float32, np.dtype(np.float16): mx.float16,
               np.dtype(np.int32): mx.int32, np.dtype(np.uint32): mx.uint32, np.dtype(np.int64): mx.int64,
               np.dtype(np.uint8): mx.uint8, np.dtype(np.bool_): mx.bool_}

# Metal thread attributes MLX adds to the signature when the body names them (its order),
# and how the launcher computes each from msl_emu::Where `w`.
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint", "(w.group_size[0] * w.group_size[1] * w.group_size[2] + 3) / 4"),
    ("dispatch_simdgroups_per_threadgroup", "uint", "w.simds"),
    ("dispatch_threads_per_threadgroup", "uint3", "uint3{w.group_size[0], w.group_size[1], w.group_size[2]}"),
    ("grid_origin", "uint3", "uint3{0, 0, 0}"),
    ("grid_size", "uint3", "uint3{w.grid[0], w.grid[1], w.grid[2]}"),
    ("quadgroup_index_in_threadgroup", "uint", "w.flat / 4"),
    ("quadgroups_per_threadgroup", "uint", "(w.group_size[0] * w.group_size[1] * w.group_size[2] + 3) / 4"),
    ("simdgroup_index_in_threadgroup", "uint", "w.flat / 32"),
    ("simdgroups_per_threadgroup", "uint", "w.simds"),
    ("thread_execution_width", "uint", "32u"),
    ("thread_index_in_quadgroup", "uint", "w.flat % 4"),
    ("thread_index_in_simdgroup", "uint", "w.flat % 32"),
    ("thread_index_in_threadgroup", "uint", "w.flat"),
    ("thread_position_in_grid", "uint3",
     "uint3{w.group[0] * w.tg[0] + w.local[0], w.group[1] * w.tg[1] + w.local[1], w.group[2] * w.tg[2] + w.local[2]}"),
    ("thread_position_in_threadgroup", "uint3", "uint3{w.local[0], w.local[1], w.local[2]}"),
    ("threadgroup_position_in_grid", "uint3", "uint3{w.group[0], w.group[1], w.group[2]}"),
    ("threadgroups_per_grid", "uint3", "uint3{w.groups[0], w.groups[1], w.groups[2]}"),
    ("threads_per_grid", "uint3", "uint3{w.grid[0], w.grid[1], w.grid[2]}"),
    ("threads_per_simdgroup", "uint", "32u"),
    ("threads_per_threadgroup", "uint3", "uint3{w.group_size[0], w.group_size[1], w.group_size[2]}"),
]

# `threadgroup T name[N]...;` in a body: a per-worker static, poisoned once per threadgroup.
THREADGROUP_ARRAY = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\]\s*)+);")


class CompileError(RuntimeError):
    """clang rejected a kernel; the message is its diagnostics."""


class EmulatorError(RuntimeError):
    """A kernel misbehaved at run time (e.g. a barrier that not every thread reached)."""


def find_clang() -> str | None:
    """The clang++ the emulator uses, or None where it is missing."""
    return shutil.which(CLANG)


def cache_dir() -> Path:
    path = Path(os.environ.get("MSL_EMU_CACHE", Path(tempfile.gettempdir()) / f"msl_emu-{os.getuid()}"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Param:
    """One buffer of the generated signature."""
    name: str
    ctype: str  # e.g. "const device float*"
    reference: bool = False  # a `const constant T&` (0-d input or `_ndim`)


def template_value(value) -> tuple[str, str]:
    """(parameter kind, argument text) of one template argument, as MLX writes them."""
    if isinstance(value, mx.Dtype):
        return "typename", TYPES[value][0]
    if isinstance(value, bool):
        return "bool", str(int(value))
    if isinstance(value, int):
        return "int", str(value)
    raise TypeError(f"template arguments are mx.Dtype, int or bool, not {type(value).__name__}")


class Kernel:
    """A kernel body built like `mx.fast.metal_kernel(...)`: call it like the MLX kernel, or
    `check` it (compile only)."""

    def __init__(self, name: str, input_names, output_names, source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False):
        if atomic_outputs:
            raise NotImplementedError("msl_emu does not emulate atomic outputs")
        if not output_names:
            raise ValueError("a kernel needs at least one output")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.attributes = [(a, t, expr) for a, t, expr in ATTRIBUTES if a in source]
        self.workers = os.cpu_count() or 1

    def signature(self, inputs: list[tuple[mx.Dtype, int, int]], output_dtypes) -> list[Param]:
        """Buffers in slot order, from each input's (dtype, ndim, size) as MLX does."""
        params = []
        for name, (dtype, ndim, size) in zip(self.input_names, inputs):
            space = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
            ctype = TYPES[dtype][0]
            if ndim == 0:
                params.append(Param(name, f"const {space} {ctype}", reference=True))
                continue
            params.append(Param(name, f"const {space} {ctype}*"))
            if f"{name}_shape" in self.source:
                params.append(Param(f"{name}_shape", "const constant int*"))
            if f"{name}_strides" in self.source:
                params.append(Param(f"{name}_strides", "const constant int64_t*"))
            if f"{name}_ndim" in self.source:
                params.append(Param(f"{name}_ndim", "const constant int", reference=True))
        params += [Param(name, f"device {TYPES[dtype][0]}*") for name, dtype in zip(self.output_names, output_dtypes)]
        return params

    def program(self, params: list[Param], template) -> str:
        """The translation unit: MLX's generated kernel plus, for running, a launcher."""
        template = list(template or [])
        kinds = [template_value(v) for _, v in template]
        body = THREADGROUP_ARRAY.sub(
            r"static thread_local threadgroup \1 \2\3; msl_emu::fresh((void*)\2, sizeof(\2));", self.source)
        head = f"template <{', '.join(f'{k} {n}' for (n, _), (k, _) in zip(template, kinds))}>\n" if template else ""
        args = [f"  {p.ctype}{'&' if p.reference else ''} {p.name} [[buffer({i})]]" for i, p in enumerate(params)]
        args += [f"  {t} {a} [[{a}]]" for a, t, _ in self.attributes]
        func = f"custom_kernel_{self.name}"
        call = f"{func}<{', '.join(v for _, v in kinds)}>" if template else func
        code = ["#include <metal_stdlib>", "using namespace metal;", self.header,
                f"{head}[[kernel]] void {func}(\n" + ",\n".join(args) + ") {", body, "}"]
        if template:
            code.append(f"template decltype({call}) {call};")
        casts = [f"*({p.ctype}*)b[{i}]" if p.reference else f"({p.ctype})b[{i}]" for i, p in enumerate(params)]
        casts += [expr for _, _, expr in self.attributes]
        code.append(
            "namespace {\n"
            "void msl_emu_body(void* buffers, const msl_emu::Where& w) {\n"
            "  void** b = static_cast<void**>(buffers);\n"
            "  (void)b; (void)w;\n"
            f"  {call}({', '.join(casts)});\n"
            "}\n"
            "}  // namespace\n"
            'extern "C" int msl_emu_launch(void** buffers, const unsigned* grid, const unsigned* tg,\n'
            "                              unsigned workers, char* error, unsigned error_size) {\n"
            "  const std::string e = msl_emu::launch(grid, tg, workers, msl_emu_body, buffers);\n"
            "  std::snprintf(error, error_size, \"%s\", e.c_str());\n"
            "  return e.empty() ? 0 : 1;\n"
            "}\n")
        return "\n".join(code)

    def check(self, *, inputs, output_dtypes, template=None):
        """Type-checks the kernel MLX would generate for these inputs (arrays, or anything
        with their dtype, ndim and size); raises CompileError with clang's diagnostics."""
        params = self.signature([(x.dtype, x.ndim, x.size) for x in inputs], output_dtypes)
        compile_source(self.program(params, template), syntax_only=True)

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        if len(inputs) != len(self.input_names) or len(output_shapes) != len(self.output_names):
            raise ValueError(f"{self.name}: expected {len(self.input_names)} inputs and "
                             f"{len(self.output_names)} outputs")
        arrays = [self._host_array(x) for x in inputs]
        params = self.signature([(dtype, a.ndim, a.size) for dtype, a in arrays], output_dtypes)
        source = self.program(params, template)
        if verbose:
            print(source)
        library = load_library(compile_source(source))

        keep, pointers = [], []
        for name, (_, a) in zip(self.input_names, arrays):
            pointers.append(a.ctypes.data)
            extras = {"_shape": np.array(a.shape, np.int32), "_strides": np.array(a.strides, np.int64) // a.itemsize,
                      "_ndim": np.array(a.ndim, np.int32)}
            for suffix, value in extras.items():
                if a.ndim > 0 and f"{name}{suffix}" in self.source:
                    keep.append(value)
                    pointers.append(value.ctypes.data)
        outputs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            out = np.empty(tuple(shape), TYPES[dtype][1])
            if init_value is None:
                out.view(np.uint8)[...] = 0xFF
            else:
                out[...] = to_numpy(mx.array(init_value, dtype))
            outputs.append(out)
            pointers.append(out.ctypes.data)

        buffers = (ctypes.c_void_p * len(pointers))(*pointers)
        error = ctypes.create_string_buffer(1024)
        dims = ctypes.c_uint * 3
        status = library.msl_emu_launch(buffers, dims(*grid), dims(*threadgroup), self.workers, error, len(error))
        if status:
            raise EmulatorError(f"{self.name}: {error.value.decode()}")
        return [to_mx(out, dtype) for out, dtype in zip(outputs, output_dtypes)]

    def _host_array(self, x) -> tuple[mx.Dtype, np.ndarray]:
        """(dtype, numpy view of its bytes); a numpy input keeps its strides unless the kernel
        wants row-contiguous inputs."""
        if isinstance(x, np.ndarray):
            dtype = NUMPY_TO_MX[x.dtype]
            return dtype, np.ascontiguousarray(x) if self.ensure_row_contiguous else x
        return x.dtype, to_numpy(x)


def to_numpy(x: mx.array) -> np.ndarray:
    """The bytes of `x` as numpy (bfloat16 as uint16)."""
    return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


def to_mx(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def metal_kernel(name: str, input_names, output_names, source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False) -> Kernel:
    """Drop-in for `mx.fast.metal_kernel` that runs on the CPU."""
    return Kernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs)


def compile_source(source: str, syntax_only: bool = False) -> Path | None:
    """Compiles a translation unit into a cached shared library (or only checks it)."""
    clang = find_clang()
    if clang is None:
        raise CompileError(f"{CLANG} not found: apt install clang-19 (or set MSL_EMU_CLANG)")
    if syntax_only:
        with tempfile.NamedTemporaryFile("w", suffix=".cpp", dir=cache_dir(), delete=False) as f:
            f.write(source)
        try:
            result = subprocess.run([clang, *FLAGS, "-fsyntax-only", f.name], capture_output=True, text=True)
        finally:
            os.unlink(f.name)
        if result.returncode:
            raise CompileError(result.stderr)
        return None
    key = hashlib.sha1((source + clang + " ".join(FLAGS) + shim_digest()).encode()).hexdigest()[:16]
    library = cache_dir() / f"kernel_{key}.so"
    if library.exists():
        return library
    cpp = library.with_suffix(f".{os.getpid()}.cpp")
    cpp.write_text(source)
    partial = library.with_suffix(f".{os.getpid()}.so")
    result = subprocess.run([clang, *FLAGS, "-O2", "-fPIC", "-shared", str(cpp), "-o", str(partial), "-lpthread"],
                            capture_output=True, text=True)
    cpp.unlink()
    if result.returncode:
        raise CompileError(result.stderr)
    partial.replace(library)
    return library


_SHIM_DIGEST: list[str] = []
_LIBRARIES: dict[Path, ctypes.CDLL] = {}


def shim_digest() -> str:
    if not _SHIM_DIGEST:
        h = hashlib.sha1()
        for path in sorted(SHIM.iterdir()):
            h.update(path.read_bytes())
        _SHIM_DIGEST.append(h.hexdigest())
    return _SHIM_DIGEST[0]


def load_library(path: Path) -> ctypes.CDLL:
    if path not in _LIBRARIES:
        library = ctypes.CDLL(str(path))
        library.msl_emu_launch.restype = ctypes.c_int
        library.msl_emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint),
                                           ctypes.POINTER(ctypes.c_uint), ctypes.c_uint,
                                           ctypes.POINTER(ctypes.c_char), ctypes.c_uint]
        _LIBRARIES[path] = library
    return _LIBRARIES[path]
