"""The KVAttention custom op's kernel (kvattn.c): found or built, loaded, and wired to LiteRT.

`load(num_threads)` gives a `Kernel`: what a LiteRT compiled model registers as the custom op
`KVAttention` (`.kernel` and `.user_data` for `LiteRtAddCustomOpKernelOption`), its error
counter, and `attention` over numpy arrays (the same computation, for tests).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

from service.engine.native.build import DEFAULT_LIBRARY, SOURCE, BuildError, build, compiler

_vp, _int = ctypes.c_void_p, ctypes.c_int


class KernelUnavailable(RuntimeError):
    """The kernel cannot be loaded here; the message is one line saying why."""


def _litert_library() -> Path:
    """libLiteRt.so of the installed ai_edge_litert, found without importing the package."""
    spec = importlib.util.find_spec("ai_edge_litert")
    if spec is None or not spec.submodule_search_locations:
        raise KernelUnavailable("the ai_edge_litert package is not installed")
    for directory in spec.submodule_search_locations:
        path = Path(directory) / "libLiteRt.so"
        if path.exists():
            return path
    raise KernelUnavailable(f"no libLiteRt.so in {list(spec.submodule_search_locations)}")


def _library(path: Path) -> Path:
    """`path`, built first if it is missing or older than kvattn.c."""
    if path.exists() and path.stat().st_mtime >= SOURCE.stat().st_mtime:
        return path
    state = "missing" if not path.exists() else "older than kvattn.c"
    if compiler() is None:
        raise KernelUnavailable(f"{path} is {state} and there is no C compiler (cc or gcc) to build it")
    try:
        return build(path)
    except BuildError as exc:
        raise KernelUnavailable(f"{path} is {state} and building it failed: {exc}") from None
    except OSError as exc:
        raise KernelUnavailable(f"{path} is {state} and cannot be written: {exc}") from None


def _bind(lib: ctypes.CDLL) -> None:
    for name, argtypes, restype in [
        ("kvattn_set_api", [_vp, _vp], None),
        ("kvattn_context_new", [_int], _vp),
        ("kvattn_context_free", [_vp], None),
        ("kvattn_context_threads", [_vp], _int),
        ("kvattn_context_set_serial_work", [_vp, ctypes.c_long], ctypes.c_long),
        ("kvattn_errors", [_vp], ctypes.c_long),
        ("kvattn_kernel", [], _vp),
        ("kvattn_fast_path", [], _int),
        ("kvattn_force_portable", [_int], _int),
        ("kvattn_compute", [_vp] * 6 + [_int] + [_vp] * 2 + [_int] * 5, _int),
        ("kvattn_to_half", [_vp, ctypes.c_long, _vp, ctypes.c_long, ctypes.c_long, ctypes.c_long], None),
    ]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype


def _blocks_contiguous(a: np.ndarray) -> bool:
    """Whether each a[i] is one C-contiguous run (the first axis may have any stride)."""
    return a[0].flags.c_contiguous and a.strides[0] % a.itemsize == 0 and a.strides[0] >= 0


class Kernel:
    """One registration of the KVAttention kernel: a context with its own threads (`num_threads`
    in all, the calling thread included) and scratch, shared by every node of the op in the
    models it is registered with. Calls through one Kernel are serialized.

    Keep it alive (and do not `close` it) while any compiled model that registered it may run:
    LiteRT holds only the raw `user_data` address. LiteRT ignores the status the op returns, so
    a failed call (bad shapes or types, no memory) shows only in `errors()`, which the host
    checks; the op then writes zeros."""

    name = "KVAttention"

    def __init__(self, lib: ctypes.CDLL, path: Path, num_threads: int):
        self._lib = lib
        self.path = path
        self.kernel: int = lib.kvattn_kernel()
        self.user_data: int | None = lib.kvattn_context_new(num_threads)
        if not self.user_data:
            raise MemoryError("kvattn_context_new")
        self.num_threads: int = lib.kvattn_context_threads(self.user_data)

    def errors(self) -> int:
        """Failed calls so far (through LiteRT or `attention`)."""
        return self._lib.kvattn_errors(self._context())

    @property
    def fast_path(self) -> bool:
        """Whether calls take the AVX2 + FMA + F16C path (where D is a multiple of 8, up to 256)."""
        return bool(self._lib.kvattn_fast_path())

    def force_portable(self, on: bool) -> bool:
        """Makes every call of this library (every Kernel) take the portable C path; returns the
        previous setting. For tests."""
        return bool(self._lib.kvattn_force_portable(int(on)))

    def set_serial_work(self, work: int) -> int:
        """Sets the work (K x (included slots + new tokens) x G) below which a call runs on the
        calling thread alone (0: every call with two items or more is shared); returns the
        previous value. For tests and measurements."""
        return self._lib.kvattn_context_set_serial_work(self._context(), work)

    def to_half(self, src: np.ndarray, dst: np.ndarray) -> None:
        """dst[...] = src for float32 `src` and float16 `dst` of one shape, rounded as numpy
        rounds, several times faster where each first-axis block of both is contiguous (a
        [K, n, D] slice of a [K, S, D] pool); numpy's own conversion elsewhere."""
        if src.shape != dst.shape or src.dtype != np.float32 or dst.dtype != np.float16:
            raise ValueError(f"to_half takes float32 and float16 arrays of one shape, not {src.dtype} "
                             f"{src.shape} and {dst.dtype} {dst.shape}")
        if src.size == 0:
            return
        block = src[0].size
        if src.ndim < 2 or not (_blocks_contiguous(src) and _blocks_contiguous(dst)):
            dst[...] = src
            return
        self._lib.kvattn_to_half(src.ctypes.data, src.strides[0] // 4, dst.ctypes.data, dst.strides[0] // 2,
                                 src.shape[0], block)

    def attention(self, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, key: np.ndarray, value: np.ndarray,
                  mask: np.ndarray) -> np.ndarray:
        """The op over numpy arrays: q fp32 [K, G*B, D], k_new and v_new fp32 [K, B, D], key and
        value fp16 or fp32 [K, S, D], mask fp32 [1, B, S + 1]; returns fp32 [K, G*B, D]. Raises
        ValueError on shapes or types the op does not take, RuntimeError if the kernel fails."""
        f32 = np.dtype(np.float32)
        arrays = {"q": q, "k_new": k_new, "v_new": v_new, "key": key, "value": value, "mask": mask}
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray) or a.ndim != 3 or not a.flags.c_contiguous:
                raise ValueError(f"{name} must be a C-contiguous 3-D numpy array")
            if a.dtype != f32 and not (name in ("key", "value") and a.dtype == np.float16):
                raise ValueError(f"{name} has dtype {a.dtype}")
        K, GB, D = q.shape
        B, S = k_new.shape[1], key.shape[1]
        if (k_new.shape != (K, B, D) or v_new.shape != (K, B, D) or key.shape != (K, S, D)
                or value.shape != key.shape or value.dtype != key.dtype or mask.shape != (1, B, S + 1)
                or (GB % B if B else GB)):
            raise ValueError(f"shapes do not fit: { {n: a.shape for n, a in arrays.items()} }")
        out = np.empty(q.shape, np.float32)
        status = self._lib.kvattn_compute(
            self._context(), q.ctypes.data, k_new.ctypes.data, v_new.ctypes.data, key.ctypes.data, value.ctypes.data,
            int(key.dtype == np.float16), mask.ctypes.data, out.ctypes.data, K, GB // B if B else 0, B, S, D)
        if status != 0:
            raise RuntimeError(f"kvattn_compute: status {status}")
        return out

    def close(self) -> None:
        """Stops the threads and frees the context."""
        if self.user_data:
            self._lib.kvattn_context_free(self.user_data)
            self.user_data = None

    def _context(self) -> int:
        if not self.user_data:
            raise RuntimeError("the kernel is closed")
        return self.user_data

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def load(num_threads: int = 2, library: Path | None = None) -> Kernel:
    """The kernel from `library` (default: libkvattn.so next to kvattn.c), built there first if it
    is missing or older than kvattn.c, with its LiteRT API pointers set from the installed
    ai_edge_litert's libLiteRt.so. `num_threads`: threads per call, the caller included (< 1: 2).
    Raises KernelUnavailable (one line saying why) when it cannot."""
    path = _library(Path(library) if library is not None else DEFAULT_LIBRARY)
    litert = ctypes.CDLL(str(_litert_library()))
    try:
        lib = ctypes.CDLL(str(path))
        _bind(lib)
    except (OSError, AttributeError) as exc:
        raise KernelUnavailable(f"{path} does not load: {exc}") from None
    lib.kvattn_set_api(ctypes.cast(litert.LiteRtGetTensorBufferHostMemory, _vp).value,
                       ctypes.cast(litert.LiteRtGetTensorBufferTensorType, _vp).value)
    return Kernel(lib, path, num_threads)
