"""A .tflite file compiled and run by LiteRT's C API (libLiteRt.so, by ctypes) over numpy arrays
the host owns.

The C API rather than the Python `CompiledModel`: it takes custom op kernels
(`LiteRtAddCustomOpKernelOption`: `CustomOp`), which the Python wrapper cannot, and importing its
pybind wrapper was part of the start-up time. Functions, structs and enum values follow the
headers of ai-edge-litert 2.3.0 (google-ai-edge/LiteRT at 19a1585ff, litert/c/*.h).

The decoder keeps its key/value pool in arrays it reads and writes in place, so a call must run
over them without copying: a host-memory tensor buffer (`LiteRtCreateTensorBufferFromHostMemory`)
wraps each array, with the tensor's own shape.

XNNPACK packs the weights once, into a cache file (the CPU options' `weight_cache_file_path`)
that every signature reads: the Interpreter packed them once per signature, in anonymous
memory (279 MiB for the 134 MiB int8 file of a SmolLM2 shape). The packed weights are then file
pages, which the kernel can drop and read again under a memory limit rather than kill the
process. The file is removed as soon as the model is compiled (its pages stay mapped).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import mmap
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import ai_edge_litert

from service import memory

log = logging.getLogger(__name__)

_MAX_RANK = 8  # LITERT_TENSOR_MAX_RANK
_HW_CPU = 1  # kLiteRtHwAcceleratorCpu
_RANKED = 0  # kLiteRtRankedTensorType
# LiteRtElementType (TfLiteType's values) of the types numpy holds.
_DTYPES = {1: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16, 9: np.int8,
           10: np.float16, 11: np.float64, 13: np.uint64, 16: np.uint32, 17: np.uint16}
_ELEMENT_TYPES = {np.dtype(dtype): code for code, dtype in _DTYPES.items()}
_STATUS = {1: "invalid argument", 2: "memory allocation failure", 3: "runtime failure", 4: "missing input tensor",
           5: "unsupported", 6: "not found", 7: "timeout expired", 8: "wrong version", 9: "unknown",
           10: "already exists", 500: "file I/O", 501: "invalid flatbuffer", 502: "dynamic loading",
           503: "serialization", 504: "compilation", 1000: "index out of bounds"}  # LiteRtStatus


class _Layout(ctypes.Structure):  # LiteRtLayout (litert/c/litert_layout.h)
    _fields_ = [("rank", ctypes.c_uint, 7), ("has_strides", ctypes.c_uint, 1),
                ("dimensions", ctypes.c_int32 * _MAX_RANK), ("strides", ctypes.c_uint32 * _MAX_RANK)]

    @property
    def shape(self) -> list[int]:
        return list(self.dimensions[:self.rank])


class _RankedTensorType(ctypes.Structure):  # LiteRtRankedTensorType (litert/c/litert_model_types.h)
    _fields_ = [("element_type", ctypes.c_int), ("layout", _Layout)]


_p, _size, _status = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
_out = ctypes.POINTER
_FUNCTIONS = {  # name: (argument types, result type)
    "LiteRtCreateEnvironment": ([ctypes.c_int, _p, _out(_p)], _status),
    "LiteRtDestroyEnvironment": ([_p], None),
    "LiteRtCreateModelFromFile": ([_p, ctypes.c_char_p, _out(_p)], _status),
    "LiteRtDestroyModel": ([_p], None),
    "LiteRtGetNumModelSignatures": ([_p, _out(_size)], _status),
    "LiteRtGetModelSignature": ([_p, _size, _out(_p)], _status),
    "LiteRtGetSignatureKey": ([_p, _out(ctypes.c_char_p)], _status),
    "LiteRtGetNumSignatureInputs": ([_p, _out(_size)], _status),
    "LiteRtGetNumSignatureOutputs": ([_p, _out(_size)], _status),
    "LiteRtGetSignatureInputName": ([_p, _size, _out(ctypes.c_char_p)], _status),
    "LiteRtGetSignatureOutputName": ([_p, _size, _out(ctypes.c_char_p)], _status),
    "LiteRtGetSignatureInputTensorByIndex": ([_p, _size, _out(_p)], _status),
    "LiteRtGetSignatureOutputTensorByIndex": ([_p, _size, _out(_p)], _status),
    "LiteRtGetTensorTypeId": ([_p, _out(ctypes.c_int)], _status),
    "LiteRtGetRankedTensorType": ([_p, _out(_RankedTensorType)], _status),
    "LiteRtCreateOptions": ([_out(_p)], _status),
    "LiteRtDestroyOptions": ([_p], None),
    "LiteRtSetOptionsHardwareAccelerators": ([_p, ctypes.c_int], _status),
    "LiteRtCreateOpaqueOptions": ([ctypes.c_char_p, _p, _p, _out(_p)], _status),
    "LiteRtDestroyOpaqueOptions": ([_p], None),
    "LiteRtAddOpaqueOptions": ([_p, _p], _status),
    "LiteRtAddCustomOpKernelOption": ([_p, ctypes.c_char_p, ctypes.c_int, _p, _p], _status),
    "LiteRtCreateCompiledModel": ([_p, _p, _p, _out(_p)], _status),
    "LiteRtDestroyCompiledModel": ([_p], None),
    "LiteRtCompiledModelResizeInputTensor": ([_p, _size, _size, _out(ctypes.c_int), _size], _status),
    "LiteRtGetCompiledModelOutputTensorLayouts": ([_p, _size, _size, _out(_Layout), ctypes.c_bool], _status),
    "LiteRtRunCompiledModel": ([_p, _size, _size, _out(_p), _size, _out(_p)], _status),
    "LiteRtCreateTensorBufferFromHostMemory": ([_out(_RankedTensorType), _p, _size, _p, _out(_p)], _status),
    "LiteRtDestroyTensorBuffer": ([_p], None),
}


def _c_api() -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.join(os.path.dirname(ai_edge_litert.__file__), "libLiteRt.so"))
    for name, (arguments, result) in _FUNCTIONS.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


_LIB = _c_api()
# The process's C library: its strdup makes the CPU options' payload, which LiteRT frees with its free.
_LIBC = ctypes.CDLL(None)
_LIBC.strdup.argtypes, _LIBC.strdup.restype = [ctypes.c_char_p], ctypes.c_void_p
_LIBC.free.argtypes, _LIBC.free.restype = [ctypes.c_void_p], None


def _check(status: int, call: str, said: list[str] = ()) -> None:
    """Raise a RuntimeError naming the C call and its status (and the errors LiteRT logged, `said`)."""
    if status != 0:
        raise RuntimeError(_failure(f"{call} failed: LiteRtStatus {status} ({_STATUS.get(status, 'unknown')})", said))


def _failure(message: str, said: list[str]) -> str:
    errors = [line for line in said if line.startswith("ERROR")]
    return message + (": " + " / ".join(errors[-3:]) if errors else "")


class _Buffer:
    """A LiteRT tensor buffer over `array`'s memory, shaped as the array (which it keeps alive)."""

    _handle = None
    _destroy = _LIB.LiteRtDestroyTensorBuffer  # held here: module globals may be gone when __del__ runs at exit

    def __init__(self, array: np.ndarray):
        if array.ndim > _MAX_RANK or not array.flags.c_contiguous:
            raise ValueError(f"a tensor buffer needs a C-contiguous array of rank <= {_MAX_RANK}")
        tensor_type = _RankedTensorType(_ELEMENT_TYPES[array.dtype],
                                        _Layout(array.ndim, 0, (ctypes.c_int32 * _MAX_RANK)(*array.shape)))
        handle = ctypes.c_void_p()
        _check(_LIB.LiteRtCreateTensorBufferFromHostMemory(
            ctypes.byref(tensor_type), array.ctypes.data, max(array.nbytes, 1), None, ctypes.byref(handle)),
            f"LiteRtCreateTensorBufferFromHostMemory (shape {array.shape}, {array.dtype})")
        self.array, self._handle = array, handle.value

    def __del__(self):
        if self._handle is not None:
            self._destroy(self._handle)
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


def release_pages(array: np.ndarray) -> int:
    """Give the kernel back the whole pages inside a C-contiguous array's span (anonymous
    memory: they read as zeros after); returns the bytes."""
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    start += -start % mmap.PAGESIZE
    end -= end % mmap.PAGESIZE
    return end - start if end > start and _dont_need(start, end - start) else 0


_MADV_POPULATE_WRITE = 23  # Linux 5.14


def populate(array: np.ndarray) -> None:
    """Fault in the pages of a C-contiguous array's span at once, writable (one madvise(2) where
    the kernel has MADV_POPULATE_WRITE, instead of a fault per page as they are first written;
    nothing elsewhere)."""
    libc = memory.glibc()
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    start -= start % mmap.PAGESIZE
    if libc is not None and end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_POPULATE_WRITE)


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
    """Send what LiteRT's C++ runtime writes to stderr meanwhile to this module's log at DEBUG;
    yields a list that holds those lines once the block is left.

    It writes a dozen lines as a model is compiled and as a signature first runs (the
    accelerators it looks for, vendor plugins it cannot load) past Python's logging, which
    would break a log of JSON lines (LOG_FORMAT=json). fd 2 is the process's: other lines
    written meanwhile go back to stderr as they were."""
    sys.stderr.flush()
    saved = os.dup(2)
    said: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            others = []
            for line in sink.read().decode(errors="replace").splitlines():
                if _RUNTIME_LINE.match(line):
                    log.debug("LiteRT: %s", line)
                    said.append(line)
                elif line:
                    others.append(line)
            if others:
                sys.stderr.write("\n".join(others) + "\n")
                sys.stderr.flush()


def _tensor_type(tensor: int, what: str) -> tuple[np.dtype, list[int]]:
    """A model tensor's dtype and shape as the file declares it (1 where a dimension is open)."""
    type_id = ctypes.c_int()
    _check(_LIB.LiteRtGetTensorTypeId(tensor, ctypes.byref(type_id)), f"LiteRtGetTensorTypeId ({what})")
    if type_id.value != _RANKED:
        raise ValueError(f"{what} has no fixed rank")
    ranked = _RankedTensorType()
    _check(_LIB.LiteRtGetRankedTensorType(tensor, ctypes.byref(ranked)), f"LiteRtGetRankedTensorType ({what})")
    if ranked.element_type not in _DTYPES:
        raise ValueError(f"{what} has element type {ranked.element_type}, which numpy does not hold")
    # An open dimension is negative here; the compiled model's layout has 1 there until a resize.
    return np.dtype(_DTYPES[ranked.element_type]), [max(d, 1) for d in ranked.layout.shape]


@dataclasses.dataclass(frozen=True)
class _SignatureInfo:
    """What the model file says of one signature (indices are the C API's)."""

    index: int
    input_names: list[str]
    output_names: list[str]
    input_types: dict[str, tuple[np.dtype, list[int]]]
    output_dtypes: dict[str, np.dtype]


def _signatures(model: int) -> dict[str, _SignatureInfo]:
    count = ctypes.c_size_t()
    _check(_LIB.LiteRtGetNumModelSignatures(model, ctypes.byref(count)), "LiteRtGetNumModelSignatures")
    found = {}
    for index in range(count.value):
        signature, text, n = ctypes.c_void_p(), ctypes.c_char_p(), ctypes.c_size_t()
        _check(_LIB.LiteRtGetModelSignature(model, index, ctypes.byref(signature)), "LiteRtGetModelSignature")
        _check(_LIB.LiteRtGetSignatureKey(signature, ctypes.byref(text)), "LiteRtGetSignatureKey")
        key = text.value.decode()
        sides = {}
        for side, number, name_of, tensor_of in (
                ("input", _LIB.LiteRtGetNumSignatureInputs, _LIB.LiteRtGetSignatureInputName,
                 _LIB.LiteRtGetSignatureInputTensorByIndex),
                ("output", _LIB.LiteRtGetNumSignatureOutputs, _LIB.LiteRtGetSignatureOutputName,
                 _LIB.LiteRtGetSignatureOutputTensorByIndex)):
            _check(number(signature, ctypes.byref(n)), f"LiteRtGetNumSignature{side.title()}s")
            types = {}
            for i in range(n.value):
                tensor = ctypes.c_void_p()
                _check(name_of(signature, i, ctypes.byref(text)), f"LiteRtGetSignature{side.title()}Name")
                name = text.value.decode()
                _check(tensor_of(signature, i, ctypes.byref(tensor)), f"LiteRtGetSignature{side.title()}TensorByIndex")
                types[name] = _tensor_type(tensor.value, f"{key}'s {side} {name}")
            sides[side] = types
        found[key] = _SignatureInfo(index, list(sides["input"]), list(sides["output"]), sides["input"],
                                    {name: dtype for name, (dtype, _) in sides["output"].items()})
    return found


class Signature:
    """One signature's inputs and outputs as host arrays.

    `resize(shapes)` gives the inputs new shapes (and the outputs the shapes that follow);
    `run()` runs the signature over `inputs`, writing `outputs`. With `reuse`, an array's memory
    is kept and a later shape that fits it is a view of it (it grows, never shrinks, like
    TFLite's arena: calls whose shapes change every time, such as prefill chunks, touch no new
    pages); without, each resize allocates afresh, so the old arrays stay readable until
    dropped and their memory goes back when they are."""

    def __init__(self, program: Program, name: str, reuse: bool):
        self.name, self._program, self._reuse = name, program, reuse  # the program outlives its signatures
        self._info = info = program.signatures[name]
        self._index = info.index
        self._input_index = {n: i for i, n in enumerate(info.input_names)}
        self.output_names: list[str] = list(info.output_names)
        self._layouts = (_Layout * len(self.output_names))()
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self.shapes: dict[str, list[int]] | None = None
        self._buffers: dict[str, dict[str, _Buffer]] = {"inputs": {}, "outputs": {}}
        self._handles = None  # the buffers' handles in the C API's order, made when first run after a change
        self._memory: dict[str, np.ndarray] = {}  # with `reuse`: each tensor's flat memory
        self._ran = False

    @property
    def input_names(self) -> list[str]:
        return list(self._input_index)

    def declared(self, name: str) -> list[int]:
        """An input's shape as the model file declares it (1 where a dimension is open)."""
        return list(self._info.input_types[name][1])

    def dtype(self, name: str) -> np.dtype:
        """An input's element type as the model file declares it."""
        return self._info.input_types[name][0]

    def resize(self, shapes: dict[str, list[int]]) -> None:
        """Give the named inputs these shapes (every input must have been given one by the first
        run). Arrays of changed shapes are new (or, with `reuse`, new views): contents unspecified."""
        if self.shapes == shapes:
            return
        compiled = self._compiled()
        for name, shape in shapes.items():
            if self.shapes is None or self.shapes.get(name) != shape:
                _check(_LIB.LiteRtCompiledModelResizeInputTensor(
                    compiled, self._index, self._input_index[name], (ctypes.c_int * len(shape))(*shape), len(shape)),
                    f"LiteRtCompiledModelResizeInputTensor ({self.name}'s {name} to {shape})")
        for name, shape in shapes.items():
            self._place("inputs", name, list(shape), self.dtype(name))
        # update_allocation: the new input shapes are propagated to the outputs (a dynamic model's case)
        self._call(_LIB.LiteRtGetCompiledModelOutputTensorLayouts, f"LiteRtGetCompiledModelOutputTensorLayouts "
                   f"({self.name})", compiled, self._index, len(self._layouts), self._layouts, True)
        for name, layout in zip(self.output_names, self._layouts):
            self._place("outputs", name, layout.shape, self._info.output_dtypes[name])
        self.shapes = dict(shapes)

    def reserve(self, shapes: dict[str, list[int]]) -> None:
        """With `reuse`: give the named inputs memory for these shapes now, so that resizing
        to any of them (or smaller) keeps the memory and what it holds. Any array of an input
        whose memory grows is new: call this before writing the inputs."""
        if not self._reuse:
            raise ValueError("only a signature that reuses its memory reserves it")
        for name, shape in shapes.items():
            before = self._memory.get(f"inputs/{name}")
            if self._memory_for("inputs", name, shape, self.dtype(name)) is not before:
                self.inputs.pop(name, None)
                self._buffers["inputs"].pop(name, None)
                self.shapes, self._handles = None, None

    def _memory_for(self, side: str, name: str, shape: list[int], dtype: np.dtype) -> np.ndarray:
        """A tensor's flat memory, holding at least `shape`: the kept one, or new and larger."""
        key, count = f"{side}/{name}", int(np.prod(shape, dtype=np.int64))
        kept = self._memory.get(key)
        if kept is None or kept.size < count or kept.dtype != dtype:
            kept = self._memory[key] = host_array([max(count, 1)], dtype)
        return kept

    def _place(self, side: str, name: str, shape: list[int], dtype: np.dtype) -> None:
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
        self._handles = None

    def trim(self) -> int:
        """With `reuse`: give the kernel back the pages of each tensor's memory past what its
        array now spans (they read as zeros if used again); returns the bytes."""
        released = 0
        for key, flat in self._memory.items():
            side, name = key.split("/", 1)
            array = (self.inputs if side == "inputs" else self.outputs).get(name)
            released += release_pages(flat[array.size if array is not None else 0:])
        return released

    def populate(self, names: Iterable[str], count: int) -> None:
        """With `reuse`: fault in the first `count` elements of these inputs' memory at once."""
        for name in names:
            populate(self._memory[f"inputs/{name}"][:count])

    def drop(self, names: Iterable[str]) -> int:
        """With `reuse`: give the kernel back every page of these inputs' memory, which read as
        zeros after; returns the bytes (what using them again can take back)."""
        return sum(release_pages(self._memory[f"inputs/{name}"])
                   for name in names if f"inputs/{name}" in self._memory)

    def release(self) -> None:
        """Let go of every array (the next `resize` allocates afresh)."""
        self.inputs, self.outputs, self.shapes, self._memory = {}, {}, None, {}
        self._buffers, self._handles = {"inputs": {}, "outputs": {}}, None

    def _run_handles(self) -> tuple:
        missing = [n for n in self._input_index if n not in self._buffers["inputs"]]
        if missing or self.shapes is None:
            raise ValueError(f"{self.name}: resize every input before running (no shape for {missing or 'some'})")
        handles = []
        for side, names in (("inputs", self._input_index), ("outputs", self.output_names)):
            buffers = self._buffers[side]
            handles.append((ctypes.c_void_p * len(names))(*[buffers[n]._handle for n in names]))
        return tuple(handles)

    def run(self) -> None:
        if self._handles is None:
            self._handles = self._run_handles()
        inputs, outputs = self._handles
        self._call(_LIB.LiteRtRunCompiledModel, f"LiteRtRunCompiledModel ({self.name})", self._compiled(),
                   self._index, len(inputs), inputs, len(outputs), outputs)
        self._ran = True

    def _compiled(self) -> int:
        if self._program.compiled is None:
            raise RuntimeError(f"{self.name}: its program is closed")
        return self._program.compiled

    def _call(self, function, call: str, *arguments) -> None:
        """Call `function` and check its status. Until the signature has run, what LiteRT says
        meanwhile is logged (its ops are prepared then: the first run sets up the delegate, and a
        missing custom op kernel is found when the outputs are first allocated, not at compile)."""
        if self._ran:
            _check(function(*arguments), call)
            return
        with runtime_messages_logged() as said:
            status = function(*arguments)
        _check(status, call, said)


@dataclasses.dataclass(frozen=True)
class CustomOp:
    """A kernel for the model's CUSTOM ops of this name: `kernel` is the address of a
    `LiteRtCustomOpKernel` (litert/c/litert_custom_op_kernel.h: Init, GetOutputLayouts, Run,
    Destroy), which LiteRT copies; its functions and `user_data` must outlive the Program."""

    name: str
    kernel: int
    user_data: int = 0
    version: int = 1


class Program:
    """A .tflite file compiled for the CPU (XNNPACK, `num_threads` threads), its weights packed
    once for all its signatures, with `custom_ops` registered. `close()` (or collection) destroys
    it; its signatures keep it alive until then."""

    compiled = None  # LiteRtCompiledModel
    _destroy = (_LIB.LiteRtDestroyCompiledModel, _LIB.LiteRtDestroyOptions, _LIB.LiteRtDestroyModel,
                _LIB.LiteRtDestroyEnvironment)  # held here: module globals may be gone when __del__ runs at exit

    def __init__(self, path: Path, num_threads: int, custom_ops: tuple[CustomOp, ...] | list[CustomOp] = ()):
        self.custom_ops = tuple(custom_ops)
        self._handles = [None, None, None, None]  # compiled model, options, model, environment: destroyed in order
        with tempfile.TemporaryDirectory(prefix="xnnpack-") as cache_dir:
            cache = Path(cache_dir) / "weights.xnnpack"
            try:
                with runtime_messages_logged() as said:
                    self._compile(Path(path), num_threads, cache)
            except RuntimeError as error:
                self.close()
                raise RuntimeError(_failure(str(error), said)) from None
            except BaseException:
                self.close()
                raise
            cached = cache.exists()
        if not cached:
            log.warning("XNNPACK could not write its weight cache in %s: each signature packs its own copy "
                        "of the weights (set TMPDIR to a writable directory)", cache_dir)

    def _compile(self, path: Path, num_threads: int, cache: Path) -> None:
        handle = ctypes.c_void_p()
        _check(_LIB.LiteRtCreateEnvironment(0, None, ctypes.byref(handle)), "LiteRtCreateEnvironment")
        environment = self._handles[3] = handle.value
        _check(_LIB.LiteRtCreateModelFromFile(environment, os.fsencode(path), ctypes.byref(handle)),
               f"LiteRtCreateModelFromFile ({path})")
        model = self._handles[2] = handle.value
        self.signatures = _signatures(model)
        _check(_LIB.LiteRtCreateOptions(ctypes.byref(handle)), "LiteRtCreateOptions")
        options = self._handles[1] = handle.value
        _check(_LIB.LiteRtSetOptionsHardwareAccelerators(options, _HW_CPU), "LiteRtSetOptionsHardwareAccelerators")
        _add_cpu_options(options, num_threads, cache)
        for op in self.custom_ops:
            _check(_LIB.LiteRtAddCustomOpKernelOption(options, op.name.encode(), op.version, op.kernel,
                                                      op.user_data or None),
                   f"LiteRtAddCustomOpKernelOption ({op.name})")
        _check(_LIB.LiteRtCreateCompiledModel(environment, model, options, ctypes.byref(handle)),
               f"LiteRtCreateCompiledModel ({path})")
        self.compiled = self._handles[0] = handle.value

    def signature(self, name: str, reuse: bool = True) -> Signature:
        if self.compiled is None:
            raise RuntimeError("the program is closed")
        if name not in self.signatures:
            raise KeyError(f"no signature {name!r} (the model has {', '.join(self.signatures)})")
        return Signature(self, name, reuse)

    def close(self) -> None:
        """Destroy the compiled model, options, model and environment, in that order."""
        self.compiled = None
        for destroy, handle in zip(self._destroy, self._handles):
            if handle is not None:
                destroy(handle)
        self._handles = [None, None, None, None]

    def __del__(self):
        if getattr(self, "_handles", None):
            self.close()


def _add_cpu_options(options: int, num_threads: int, cache: Path) -> None:
    """The CPU accelerator's options: `LrtCreateCpuOptions` is not exported by the wheel's
    libLiteRt.so, so they go as its opaque options, identifier "xnnpack" and a TOML payload
    (litert/c/options/litert_cpu_options.cc writes it, litert/runtime/litert_cpu_options.cc
    reads it: one `key = value` a line, a string value's quotes stripped, no escapes)."""
    settings = f"num_threads = {int(num_threads)}\n"
    if '"' not in str(cache) and "\n" not in str(cache):  # else no cache: the warning after compiling says so
        settings += f'weight_cache_file_path = "{cache}"\n'
    payload = _LIBC.strdup(settings.encode())
    opaque = ctypes.c_void_p()
    status = _LIB.LiteRtCreateOpaqueOptions(b"xnnpack", payload, ctypes.cast(_LIBC.free, ctypes.c_void_p),
                                            ctypes.byref(opaque))
    if status != 0:
        _LIBC.free(payload)
        _check(status, "LiteRtCreateOpaqueOptions (xnnpack)")
    status = _LIB.LiteRtAddOpaqueOptions(options, opaque)  # which then owns them
    if status != 0:
        _LIB.LiteRtDestroyOpaqueOptions(opaque)
        _check(status, "LiteRtAddOpaqueOptions (xnnpack)")
