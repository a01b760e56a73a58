"""The KVAttention kernel (service/engine/native) against a float64 numpy reference of its contract.

Both code paths (AVX2 and portable C), fp16 and fp32 pools, one and two threads; the op's LiteRT
entry point (`Run` over real LiteRT tensor buffers), including shapes and types it refuses; the
scratch growing and shrinking between calls; the thread pool started and stopped many times.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.native import build as native_build
from service.engine.native import kvattn

EXCLUDE = -1e4  # what the service writes on the slots a row does not see
TOL = 1e-5  # max |err| / max |ref|: fp32 arithmetic over the pool's values


def reference(q, k_new, v_new, key, value, mask) -> np.ndarray:
    """The op's contract in float64: TF's softmax(concat([q @ key^T, sum(q * k_new)]) / sqrt(D) + mask)
    @ concat([value, v_new]), columns below -1000 weighted exactly 0, a row with none left zeros."""
    K, GB, D = q.shape
    B = k_new.shape[1]
    f = np.float64
    m = mask[0].astype(f)  # [B, S + 1]
    out = np.zeros(q.shape, f)
    for k in range(K):
        rows = np.arange(GB) % B  # query row g*B + b belongs to batch row b
        qk = q[k].astype(f)
        s = np.concatenate([qk @ key[k].astype(f).T, np.sum(qk * k_new[k, rows].astype(f), 1)[:, None]], 1)
        s = s / np.sqrt(D) + m[rows]
        included = m[rows] >= -1000
        s = np.where(included, s, -np.inf)
        top = s.max(1, keepdims=True)
        w = np.where(included, np.exp(s - np.where(np.isfinite(top), top, 0)), 0.0)
        total = w.sum(1, keepdims=True)
        w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
        out[k] = w[:, :-1] @ value[k].astype(f) + w[:, -1:] * v_new[k, rows].astype(f)
    return out


def aligned(shape, dtype) -> np.ndarray:
    """A zeroed C-contiguous array at a 64-byte aligned address (as LiteRT's host buffers want)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off:off + n].view(dtype).reshape(shape)


def make_inputs(K, G, B, S, D, fp16=True, seed=0, layout="mixed"):
    """q, k_new, v_new, key, value, mask. `mixed`: each row includes a random share of the pool
    (none, some, all) with values in [-3, 0] and its new token or not; `interleaved`: decode's
    steady state, slot t*B + b is row b's, 10% of the pool free, every new token included."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape, dtype in [("q", (K, G * B, D), np.float32), ("k_new", (K, B, D), np.float32),
                               ("v_new", (K, B, D), np.float32), ("key", (K, S, D), np.float16 if fp16 else np.float32),
                               ("value", (K, S, D), np.float16 if fp16 else np.float32)]:
        a = aligned(shape, dtype)
        a[...] = rng.standard_normal(shape)
        arrays[name] = a
    mask = aligned((1, B, S + 1), np.float32)
    if layout == "interleaved":
        owner = np.full(S, -1)
        used = int(S * 0.9)
        owner[:used] = np.arange(used) % B
        mask[0, :, :S] = np.where(owner[None, :] == np.arange(B)[:, None], rng.uniform(-3, 0, (B, S)), EXCLUDE)
        mask[0, :, S] = 0.0
    else:
        share = rng.choice([0.0, 0.05, 0.5, 1.0], size=(B, 1))
        included = np.concatenate([rng.random((B, S)) < share, rng.random((B, 1)) < 0.7], 1)
        mask[0] = np.where(included, rng.uniform(-3, 0, (B, S + 1)), EXCLUDE)
    arrays["mask"] = mask
    return arrays


def rel_err(got, ref) -> float:
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    return float(np.max(np.abs(got - ref)) / scale) if scale > 0 else float(np.max(np.abs(got), initial=0.0))


@pytest.fixture(scope="module")
def kernels():
    """{threads: Kernel} for 1 and 2 threads."""
    ks = {t: kvattn.load(t) for t in (1, 2)}
    yield ks
    for k in ks.values():
        k.close()


@pytest.fixture
def portable(kernels):
    """A function setting the library's path for the test (restored afterwards)."""
    kernel = kernels[1]
    before = kernel.force_portable(False)
    yield kernel.force_portable
    kernel.force_portable(before)


def test_fast_path_here(kernels):
    # The machines this runs on have AVX2 + FMA + F16C: the fast path is the one tested as such.
    assert kernels[1].fast_path


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(K=st.integers(1, 4), G=st.integers(1, 4), B=st.integers(1, 9), S=st.integers(0, 300),
       D=st.sampled_from([8, 16, 32, 64, 96, 128]), fp16=st.booleans(), use_portable=st.booleans(),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_matches_reference(kernels, portable, K, G, B, S, D, fp16, use_portable, threads, seed):
    kernel = kernels[threads]
    kernel.set_serial_work(0 if threads > 1 else 4096)  # small shapes share work too
    portable(use_portable)
    a = make_inputs(K, G, B, S, D, fp16, seed)
    errors = kernel.errors()
    got = kernel.attention(**a)
    ref = reference(**a)
    assert kernel.errors() == errors
    assert rel_err(got, ref) <= TOL
    # a row with nothing included is exactly zero
    empty = ~(a["mask"][0] >= -1000).any(1)
    assert not got[:, np.tile(empty, G)].any()


@pytest.mark.parametrize("use_portable", [False, True])
@pytest.mark.parametrize("D,G", [(12, 2), (20, 7), (64, 9), (264, 1), (1, 3)])
def test_shapes_off_the_fast_path(kernels, portable, use_portable, D, G):
    # D not a multiple of 8 or above 256, G above the fast path's 8 rows per pass.
    portable(use_portable)
    a = make_inputs(3, G, 4, 77, D, seed=D * G)
    assert rel_err(kernels[2].attention(**a), reference(**a)) <= TOL


def test_exclusion_threshold(kernels):
    # -1000 itself is included, anything below it is not; an excluded column is never read (NaN
    # keys and values there change nothing).
    a = make_inputs(2, 1, 3, 40, 64, seed=1)
    a["mask"][...] = 0.0
    a["mask"][0, :, ::3] = -1000.0
    a["mask"][0, :, 1::3] = np.nextafter(np.float32(-1000.0), np.float32(-np.inf))
    a["key"][:, 1::3] = np.nan
    a["value"][:, 1::3] = np.nan
    got = kernels[1].attention(**a)
    a["key"][:, 1::3] = 0
    a["value"][:, 1::3] = 0
    assert np.isfinite(got).all()
    assert rel_err(got, reference(**a)) <= TOL


@pytest.mark.parametrize("K,G", [(12, 1), (3, 3)])
def test_large_shapes(kernels, K, G):
    # The prototype's shapes: 8 rows over a 5,120-slot pool, decode's layout.
    a = make_inputs(K, G, 8, 5120, 64, seed=K, layout="interleaved")
    assert rel_err(kernels[2].attention(**a), reference(**a)) <= TOL


def test_scratch_grows_and_shrinks(kernels):
    rng = np.random.default_rng(7)
    kernel = kernels[2]
    kernel.set_serial_work(0)
    for i, S in enumerate([0, 5, 900, 3, 2000, 1, 64, 1500]):
        K, G, B = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 10))
        a = make_inputs(K, G, B, S, 64, fp16=bool(i % 2), seed=i)
        assert rel_err(kernel.attention(**a), reference(**a)) <= TOL, (K, G, B, S)


def test_empty_shapes(kernels):
    for K, G, B, S in [(0, 1, 2, 5), (2, 0, 2, 5), (2, 1, 0, 5)]:
        a = make_inputs(K, G, B, S, 64)
        assert kernels[2].attention(**a).shape == (K, G * B, 64)
    assert kernels[2].errors() == 0


# --- the LiteRT entry point ------------------------------------------------------------------------

_vp = ctypes.c_void_p


class _Layout(ctypes.Structure):  # LiteRtLayout
    _fields_ = [("rank", ctypes.c_uint, 7), ("has_strides", ctypes.c_uint, 1),
                ("dimensions", ctypes.c_int32 * 8), ("strides", ctypes.c_uint32 * 8)]


class _TensorType(ctypes.Structure):  # LiteRtRankedTensorType
    _fields_ = [("element_type", ctypes.c_int), ("layout", _Layout)]


class _OpKernel(ctypes.Structure):  # LiteRtCustomOpKernel
    _fields_ = [("Init", _vp), ("GetOutputLayouts", _vp), ("Run", _vp), ("Destroy", _vp)]


_TYPES = {np.dtype(np.float32): 1, np.dtype(np.int32): 2, np.dtype(np.float16): 10}


@pytest.fixture(scope="module")
def litert():
    lib = ctypes.CDLL(str(kvattn._litert_library()))
    lib.LiteRtCreateTensorBufferFromHostMemory.argtypes = [ctypes.POINTER(_TensorType), _vp, ctypes.c_size_t, _vp,
                                                           ctypes.POINTER(_vp)]
    lib.LiteRtDestroyTensorBuffer.argtypes, lib.LiteRtDestroyTensorBuffer.restype = [_vp], None
    return lib


def run_op(litert, kernel: kvattn.Kernel, arrays: list[np.ndarray], out: np.ndarray) -> int:
    """The op's Run, as LiteRT's dispatcher calls it, over host-memory tensor buffers."""
    handles = []
    try:
        for a in [*arrays, out]:
            tt = _TensorType(_TYPES[a.dtype], _Layout(a.ndim, 0, (ctypes.c_int32 * 8)(*a.shape)))
            h = _vp()
            assert litert.LiteRtCreateTensorBufferFromHostMemory(ctypes.byref(tt), a.ctypes.data, max(a.nbytes, 1),
                                                                 None, ctypes.byref(h)) == 0
            handles.append(h.value)
        table = _OpKernel.from_address(kernel.kernel)
        run = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.c_size_t, ctypes.POINTER(_vp), ctypes.c_size_t,
                               ctypes.POINTER(_vp))(table.Run)
        ins = (_vp * len(arrays))(*handles[:-1])
        outs = (_vp * 1)(handles[-1])
        return run(kernel.user_data, len(arrays), ins, 1, outs)
    finally:
        for h in handles:
            litert.LiteRtDestroyTensorBuffer(h)


ORDER = ["q", "k_new", "v_new", "key", "value", "mask"]


@pytest.mark.parametrize("fp16", [True, False])
def test_run_through_litert_buffers(kernels, litert, fp16):
    a = make_inputs(3, 3, 5, 300, 64, fp16, seed=3)
    out = aligned(a["q"].shape, np.float32)
    errors = kernels[2].errors()
    assert run_op(litert, kernels[2], [a[n] for n in ORDER], out) == 0
    assert kernels[2].errors() == errors
    assert rel_err(out, reference(**a)) <= TOL


def test_output_layout_is_q(kernels):
    table = _OpKernel.from_address(kernels[1].kernel)
    layouts = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.c_size_t, ctypes.POINTER(_Layout), ctypes.c_size_t,
                               ctypes.POINTER(_Layout))(table.GetOutputLayouts)
    ins = (_Layout * 6)(*[_Layout(3, 0, (ctypes.c_int32 * 8)(*s)) for s in
                          [(3, 15, 64), (3, 5, 64), (3, 5, 64), (3, 40, 64), (3, 40, 64), (1, 5, 41)]])
    out = (_Layout * 1)()
    assert layouts(kernels[1].user_data, 6, ins, 1, out) == 0
    assert out[0].rank == 3 and list(out[0].dimensions[:3]) == [3, 15, 64] and not out[0].has_strides
    errors = kernels[1].errors()
    assert layouts(kernels[1].user_data, 4, ins, 1, out) != 0
    assert kernels[1].errors() == errors + 1


def _bad_inputs():
    """(what is wrong, the six inputs, output shape) for calls the op must refuse."""
    def base():
        return make_inputs(2, 2, 3, 20, 16, seed=5)

    cases = []
    a = base()
    cases.append(("mask without the new token's column", dict(a, mask=aligned((1, 3, 20), np.float32)), (2, 6, 16)))
    a = base()
    cases.append(("q rows not a multiple of B", dict(a, q=aligned((2, 7, 16), np.float32)), (2, 7, 16)))
    a = base()
    cases.append(("value fp32, key fp16", dict(a, value=aligned((2, 20, 16), np.float32)), (2, 6, 16)))
    a = base()
    cases.append(("int32 pools", dict(a, key=aligned((2, 20, 16), np.int32), value=aligned((2, 20, 16), np.int32)),
                  (2, 6, 16)))
    a = base()
    cases.append(("k_new with other heads", dict(a, k_new=aligned((3, 3, 16), np.float32)), (2, 6, 16)))
    a = base()
    cases.append(("key with another D", dict(a, key=aligned((2, 20, 8), np.float16)), (2, 6, 16)))
    a = base()
    cases.append(("output not q's shape", a, (2, 6, 8)))
    a = base()
    cases.append(("q of rank 2", dict(a, q=aligned((2, 96), np.float32)), (2, 96)))
    a = base()
    cases.append(("mask with two batches", dict(a, mask=aligned((2, 3, 21), np.float32)), (2, 6, 16)))
    return cases


@pytest.mark.parametrize("what,arrays,out_shape", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_are_counted(kernels, litert, what, arrays, out_shape):
    kernel = kernels[2]
    out = aligned(out_shape, np.float32)
    out[...] = 7.0
    errors, total = kernel.errors(), kvattn_total_errors(kernel)
    assert run_op(litert, kernel, [arrays[n] for n in ORDER], out) != 0
    assert kernel.errors() == errors + 1
    assert kvattn_total_errors(kernel) == total + 1
    assert not out.any()  # zeros written, nothing else
    # and the kernel still works
    a = make_inputs(2, 2, 3, 20, 16, seed=6)
    assert rel_err(kernel.attention(**a), reference(**a)) <= TOL


def kvattn_total_errors(kernel) -> int:
    return kernel._lib.kvattn_errors(None)


def test_wrong_input_count_is_counted(kernels, litert):
    a = make_inputs(2, 1, 3, 20, 16)
    errors = kernels[1].errors()
    assert run_op(litert, kernels[1], [a[n] for n in ORDER[:5]], aligned((2, 3, 16), np.float32)) != 0
    assert kernels[1].errors() == errors + 1


def test_raw_entry_point_refuses_negative_shapes(kernels):
    kernel = kernels[1]
    errors = kernel.errors()
    assert kernel._lib.kvattn_compute(kernel.user_data, *[None] * 5, 1, None, None, 1, 1, -1, 4, 8) != 0
    assert kernel.errors() == errors + 1


def test_attention_checks_shapes(kernels):
    a = make_inputs(2, 1, 3, 20, 16)
    with pytest.raises(ValueError):
        kernels[1].attention(**dict(a, mask=a["mask"][:, :, :20].copy()))
    with pytest.raises(ValueError):
        kernels[1].attention(**dict(a, q=a["q"].astype(np.float64)))


# --- lifecycle ------------------------------------------------------------------------------------

def _threads() -> int:
    """The kernels' worker threads in this process (named "kvattn")."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            count += Path(f"/proc/self/task/{task}/comm").read_text().strip() == "kvattn"
        except FileNotFoundError:  # a thread that just ended
            pass
    return count


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_load_use_drop_many_times():
    a = make_inputs(12, 1, 8, 640, 64, seed=2, layout="interleaved")
    ref = reference(**a)
    threads, rss = _threads(), None
    for i in range(200):
        kernel = kvattn.load(2)
        kernel.set_serial_work(0)
        assert rel_err(kernel.attention(**a), ref) <= TOL
        assert _threads() == threads + 1  # one worker besides the caller
        if i % 2:
            kernel.close()
        del kernel  # the other half freed by the garbage collector
        gc.collect()
        assert _threads() == threads
        if i == 20:
            rss = _rss_kib()
    assert _rss_kib() - rss < 8 * 1024


def test_rapid_shared_calls():
    # Tiny calls shared between the caller and the worker, back to back: every race between a
    # job closing and a worker joining it happens many times over.
    with kvattn.load(2) as kernel:
        kernel.set_serial_work(0)
        cases = [make_inputs(2, 1 + i % 3, 2 + i % 2, 10 + 7 * i, 16, seed=i) for i in range(4)]
        refs = [reference(**a) for a in cases]
        for i in range(4000):
            got = kernel.attention(**cases[i % 4])
            if i % 97 == 0:
                assert rel_err(got, refs[i % 4]) <= TOL
        assert kernel.errors() == 0


def test_concurrent_callers_share_one_kernel():
    # LiteRT may run two compiled models (or signatures) at once with the same registration:
    # calls are serialized on the context, and each gets its own answer.
    kernel = kvattn.load(2)
    kernel.set_serial_work(0)
    cases = [make_inputs(3, 2, 4, 100 * (i + 1), 64, fp16=bool(i % 2), seed=i) for i in range(4)]
    refs = [reference(**a) for a in cases]
    failures = []

    def caller(i):
        for _ in range(100):
            if rel_err(kernel.attention(**cases[i]), refs[i]) > TOL:
                failures.append(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a call hung"
    assert not failures
    kernel.close()


def test_closed_kernel_refuses_calls():
    kernel = kvattn.load(2)
    kernel.close()
    kernel.close()
    with pytest.raises(RuntimeError):
        kernel.attention(**make_inputs(1, 1, 1, 4, 8))


def test_forked_child_computes(kernels):
    # A forked child has none of the parent's workers; its first call must start its own.
    kernel = kernels[2]
    kernel.set_serial_work(0)
    a = make_inputs(4, 1, 8, 600, 64, seed=9)
    ref = reference(**a)
    kernel.attention(**a)  # the parent's pool is running
    pid = os.fork()
    if pid == 0:
        try:
            ok = rel_err(kernel.attention(**a), ref) <= TOL
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's call hung")


# --- building and loading ---------------------------------------------------------------------------

def test_portable_only_build(tmp_path):
    # What an aarch64 build compiles: no x86 intrinsics at all.
    path = native_build.build(tmp_path / "libkvattn.so", extra_flags=("-DKVATTN_PORTABLE_ONLY",))
    kernel = kvattn.load(2, library=path)
    assert not kernel.fast_path
    a = make_inputs(3, 3, 4, 200, 64, seed=4)
    assert rel_err(kernel.attention(**a), reference(**a)) <= TOL
    kernel.close()


def test_load_builds_a_missing_library(tmp_path):
    path = tmp_path / "sub" / "libkvattn.so"
    kernel = kvattn.load(1, library=path)
    assert path.exists() and kernel.path == path
    kernel.close()


def test_load_without_compiler_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(kvattn, "compiler", lambda: None)
    with pytest.raises(kvattn.KernelUnavailable, match="no C compiler"):
        kvattn.load(2, library=tmp_path / "libkvattn.so")
    stale = tmp_path / "old.so"
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))
    with pytest.raises(kvattn.KernelUnavailable, match="older than kvattn.c"):
        kvattn.load(2, library=stale)


def test_build_command_line(tmp_path):
    out = tmp_path / "lib.so"
    assert native_build.main([str(out)]) == 0
    assert out.exists()
    assert native_build.main(["-h"]) == 2


def test_default_library_is_ignored_by_git():
    here = Path(kvattn.__file__).parent
    assert "libkvattn.so" in (here / ".gitignore").read_text().split()


@pytest.mark.parametrize("use_portable", [False, True])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(K=st.integers(1, 5), n=st.integers(0, 40), D=st.sampled_from([1, 7, 8, 16, 64]), offset=st.integers(0, 9),
       scale=st.sampled_from([1e-9, 1e-6, 1e-3, 1.0, 300.0, 7e4]), seed=st.integers(0, 2**32 - 1))
def test_to_half_writes_numpys_bits(kernels, portable, use_portable, K, n, D, offset, scale, seed):
    """float32 -> float16 into a slice of a [K, S, D] pool rounds exactly as numpy's astype (to
    nearest, ties to even; subnormals, overflow to infinity, NaN kept), on both paths."""
    portable(use_portable)
    rng = np.random.default_rng(seed)
    src = (rng.standard_normal((K, n, D)) * scale).astype(np.float32)
    src.reshape(-1)[:4] = np.array([np.inf, -0.0, np.nan, 65520.0], np.float32)[:src.size]
    with np.errstate(over="ignore"):
        expected = src.astype(np.float16)
    pool = np.full((K, n + offset + 3, D), 7, np.float16)
    kernels[1].to_half(src, pool[:, offset:offset + n])
    got = pool[:, offset:offset + n]
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.array_equal(got[~np.isnan(got)].view(np.uint16), expected[~np.isnan(expected)].view(np.uint16))
    assert (pool[:, :offset] == 7).all() and (pool[:, offset + n:] == 7).all()  # nothing written outside
    with pytest.raises(ValueError, match="to_half takes float32 and float16"):
        kernels[1].to_half(src, pool)
