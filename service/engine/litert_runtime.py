"""LiteRT's CompiledModel, run over numpy arrays the host owns.

The decoder keeps its key/value pool in arrays it reads and writes in place, so a call must run
over them without copying. A host-memory tensor buffer wraps each array, made by LiteRT's C API
(`LiteRtCreateTensorBufferFromHostMemory`, in the wheel's libLiteRt.so) with the tensor's own
shape: the Python wrapper's `TensorBuffer.create_from_host_memory` makes 1-D buffers only,
which a multi-dimensional input refuses.

XNNPACK packs the weights once, into a cache file (`CpuOptions.xnnpack_weight_cache_path`)
that every signature reads: the Interpreter packed them once per signature, in anonymous
memory (279 MiB for the 134 MiB int8 file of a SmolLM2 shape). The packed weights are then file
pages, which the kernel can drop and read again under a memory limit rather than kill the
process. The file is removed as soon as the model is compiled (its pages stay mapped).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import ai_edge_litert
from ai_edge_litert.compiled_model import CompiledModel
from ai_edge_litert.cpu_options import CpuOptions
from ai_edge_litert.hardware_accelerator import HardwareAccelerator
from ai_edge_litert.options import Options

from service import memory

log = logging.getLogger(__name__)

_MAX_RANK = 8  # LITERT_TENSOR_MAX_RANK
# LiteRtElementType (TfLiteType's values)
_ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.int32): 2, np.dtype(np.int64): 4, np.dtype(np.float16): 10}


class _Layout(ctypes.Structure):  # LiteRtLayout (litert/c/litert_layout.h)
    _fields_ = [("rank", ctypes.c_uint, 7), ("has_strides", ctypes.c_uint, 1),
                ("dimensions", ctypes.c_int32 * _MAX_RANK), ("strides", ctypes.c_uint32 * _MAX_RANK)]


class _RankedTensorType(ctypes.Structure):  # LiteRtRankedTensorType (litert/c/litert_model_types.h)
    _fields_ = [("element_type", ctypes.c_int), ("layout", _Layout)]


def _c_api() -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.join(os.path.dirname(ai_edge_litert.__file__), "libLiteRt.so"))
    lib.LiteRtCreateTensorBufferFromHostMemory.argtypes = [
        ctypes.POINTER(_RankedTensorType), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_void_p)]
    lib.LiteRtDestroyTensorBuffer.argtypes = [ctypes.c_void_p]
    lib.LiteRtDestroyTensorBuffer.restype = None
    return lib


_LIB = _c_api()
_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype = ctypes.py_object
_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_CAPSULE_NAME = b"LiteRtTensorBuffer"  # what the Python wrapper's run calls unwrap


class _Buffer:
    """A LiteRT tensor buffer over `array`'s memory, shaped as the array (which it keeps alive)."""

    _handle = None

    def __init__(self, array: np.ndarray):
        if array.ndim > _MAX_RANK or not array.flags.c_contiguous:
            raise ValueError(f"a tensor buffer needs a C-contiguous array of rank <= {_MAX_RANK}")
        tensor_type = _RankedTensorType(_ELEMENT_TYPES[array.dtype],
                                        _Layout(array.ndim, 0, (ctypes.c_int32 * _MAX_RANK)(*array.shape)))
        handle = ctypes.c_void_p()
        status = _LIB.LiteRtCreateTensorBufferFromHostMemory(
            ctypes.byref(tensor_type), array.ctypes.data, max(array.nbytes, 1), None, ctypes.byref(handle))
        if status != 0:
            raise RuntimeError(f"LiteRT refused a host buffer of shape {array.shape} (status {status})")
        self.array, self._handle = array, handle.value
        self.capsule = _capsule(self._handle, _CAPSULE_NAME, None)

    def __del__(self):
        if self._handle is not None:
            _LIB.LiteRtDestroyTensorBuffer(self._handle)


_MADV_DONTNEED = 4


def _dont_need(start: int, length: int) -> bool:
    """madvise(2) MADV_DONTNEED: the pages of an anonymous mapping read as zeros after, a file
    mapping's are read from the file again; their memory goes back to the kernel now. False
    where there is no glibc."""
    libc = memory.glibc()
    if libc is None:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) == 0


def drop_mapped_pages(path: Path) -> int:
    """Drop this process's resident pages of every mapping of `path`; returns the bytes."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux: nothing to release
        return 0
    released = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if _dont_need(start, end - start):
                released += end - start
    return released


def host_array(shape, dtype=np.float32) -> np.ndarray:
    """A zeroed array in its own anonymous mapping: page-aligned (LiteRT wants 64 bytes), and
    given back to the kernel whole when the array goes (a heap block could stay resident)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    mapping = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mapping, dtype, count).reshape(shape)


_RUNTIME_LINE = re.compile(r"^(INFO|WARNING|ERROR|VERBOSE): |^\u2514 ")  # LiteRT's C++ log, and its continuations


@contextlib.contextmanager
def runtime_messages_logged():
    """Send what LiteRT's C++ runtime writes to stderr meanwhile to this module's log at DEBUG.

    It writes a dozen lines as a model is compiled and as a signature first runs (the
    accelerators it looks for, vendor plugins it cannot load) past Python's logging, which
    would break a log of JSON lines (LOG_FORMAT=json). fd 2 is the process's: other lines
    written meanwhile go back to stderr as they were."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            others = []
            for line in sink.read().decode(errors="replace").splitlines():
                if _RUNTIME_LINE.match(line):
                    log.debug("LiteRT: %s", line)
                elif line:
                    others.append(line)
            if others:
                sys.stderr.write("\n".join(others) + "\n")
                sys.stderr.flush()


class Signature:
    """One signature's inputs and outputs as host arrays.

    `resize(shapes)` gives the inputs new shapes (and the outputs the shapes that follow);
    `run()` runs the signature over `inputs`, writing `outputs`. With `reuse`, an array's memory
    is kept and a later shape that fits it is a view of it (it grows, never shrinks, like
    TFLite's arena: calls whose shapes change every time, such as prefill chunks, touch no new
    pages); without, each resize allocates afresh, so the old arrays stay readable until
    dropped and their memory goes back when they are."""

    def __init__(self, model: CompiledModel, name: str, reuse: bool):
        self.name, self._model, self._reuse = name, model, reuse
        self._index = model.get_signature_index(name)
        listed = model.get_signature_list()[name]
        self._input_index = {n: i for i, n in enumerate(listed["inputs"])}
        self.output_names: list[str] = list(listed["outputs"])
        self._declared = model.get_input_tensor_details(name)  # as the file declares them
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self.shapes: dict[str, list[int]] | None = None
        self._buffers: dict[str, dict[str, _Buffer]] = {"inputs": {}, "outputs": {}}
        self._memory: dict[str, np.ndarray] = {}  # with `reuse`: each tensor's flat memory
        self._ran = False

    @property
    def input_names(self) -> list[str]:
        return list(self._input_index)

    def declared(self, name: str) -> list[int]:
        """An input's shape as the model file declares it (1 where a dimension is open)."""
        return list(self._declared[name]["shape"])

    def resize(self, shapes: dict[str, list[int]]) -> None:
        """Give the named inputs these shapes (every input must have been given one by the first
        run). Arrays of changed shapes are new (or, with `reuse`, new views): contents unspecified."""
        if self.shapes == shapes:
            return
        for name, shape in shapes.items():
            if self.shapes is None or self.shapes.get(name) != shape:
                self._model.resize_input_tensor(self._input_index[name], shape, self._index)
        for name, shape in shapes.items():
            self._place("inputs", name, shape, self._declared[name]["dtype"])
        for name, detail in self._model.get_output_tensor_details(self.name).items():
            self._place("outputs", name, list(detail["shape"]), detail["dtype"])
        self.shapes = dict(shapes)

    def reserve(self, shapes: dict[str, list[int]]) -> None:
        """With `reuse`: give the named inputs memory for these shapes now, so that resizing
        to any of them (or smaller) keeps the memory and what it holds. Any array of an input
        whose memory grows is new: call this before writing the inputs."""
        if not self._reuse:
            raise ValueError("only a signature that reuses its memory reserves it")
        for name, shape in shapes.items():
            before = self._memory.get(f"inputs/{name}")
            if self._memory_for("inputs", name, shape, self._declared[name]["dtype"]) is not before:
                self.inputs.pop(name, None)
                self._buffers["inputs"].pop(name, None)
                self.shapes = None

    def _memory_for(self, side: str, name: str, shape: list[int], dtype: str) -> np.ndarray:
        """A tensor's flat memory, holding at least `shape`: the kept one, or new and larger."""
        key, count = f"{side}/{name}", int(np.prod(shape, dtype=np.int64))
        kept = self._memory.get(key)
        if kept is None or kept.size < count or kept.dtype != np.dtype(dtype):
            kept = self._memory[key] = host_array([max(count, 1)], dtype)
        return kept

    def _place(self, side: str, name: str, shape: list[int], dtype: str) -> None:
        arrays = self.inputs if side == "inputs" else self.outputs
        current = arrays.get(name)
        if current is not None and list(current.shape) == shape:
            return
        if self._reuse:
            count = int(np.prod(shape, dtype=np.int64))
            array = self._memory_for(side, name, shape, dtype)[:count].reshape(shape)
        else:
            array = host_array(shape, dtype)
        arrays[name] = array
        self._buffers[side][name] = _Buffer(array)

    def trim(self) -> int:
        """With `reuse`: give the kernel back the pages of each tensor's memory past what its
        array now spans (they read as zeros if used again); returns the bytes."""
        released = 0
        for key, flat in self._memory.items():
            side, name = key.split("/", 1)
            array = (self.inputs if side == "inputs" else self.outputs).get(name)
            start = flat.ctypes.data + (array.nbytes if array is not None else 0)
            start += -start % mmap.PAGESIZE
            end = flat.ctypes.data + flat.nbytes
            end -= end % mmap.PAGESIZE
            if end > start and _dont_need(start, end - start):
                released += end - start
        return released

    def release(self) -> None:
        """Let go of every array (the next `resize` allocates afresh)."""
        self.inputs, self.outputs, self.shapes, self._memory = {}, {}, None, {}
        self._buffers = {"inputs": {}, "outputs": {}}

    def run(self) -> None:
        if self._ran:
            self._model.run_by_name(self.name, self._buffers["inputs"], self._buffers["outputs"])
            return
        with runtime_messages_logged():  # the first run sets up an environment of its own
            self._model.run_by_name(self.name, self._buffers["inputs"], self._buffers["outputs"])
        self._ran = True


class Program:
    """A .tflite file compiled for the CPU (XNNPACK, `num_threads` threads), its weights packed
    once for all its signatures."""

    def __init__(self, path: Path, num_threads: int):
        with tempfile.TemporaryDirectory(prefix="xnnpack-") as cache_dir:
            cache = Path(cache_dir) / "weights.xnnpack"
            options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                              cpu_options=CpuOptions(num_threads=num_threads, xnnpack_weight_cache_path=str(cache)))
            with runtime_messages_logged():
                self.model = CompiledModel.from_file(str(path), options=options)
            if not cache.exists():
                log.warning("XNNPACK could not write its weight cache in %s: each signature packs its own copy "
                            "of the weights (set TMPDIR to a writable directory)", cache_dir)

    def signature(self, name: str, reuse: bool = True) -> Signature:
        return Signature(self.model, name, reuse)
