"""Time per call of the KVAttention kernel: 2 threads, 1 thread, and optionally the prototype.

    python -m service.engine.native.bench [--proto LIB] [--shapes 1x640,8x640,8x4400] [--rounds N]

K = 12 heads, G = 1, D = 64, fp16 pools, decode's slot layout (slot t*B + b is row b's, 10% of
the pool free, every new token included). The variants are called in turn, round after round,
through ctypes on the raw entry points with preallocated outputs (the same call overhead for
each); medians and quartiles in microseconds. `--proto`: the prototype's OpenMP build
(`proto-custom-attention:proto/custom_attention`, `kv_attention` with an [1, B, S] mask and no
new token); run it with OMP_WAIT_POLICY=passive. `--threshold` instead times small calls on one
thread against two, to place the kernel's serial-work threshold.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np

from service.engine.native import kvattn

K, G, D = 12, 1, 64


def inputs(B: int, S: int, K: int = K, G: int = G, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    a = {"q": rng.standard_normal((K, G * B, D)).astype(np.float32),
         "k_new": rng.standard_normal((K, B, D)).astype(np.float32),
         "v_new": rng.standard_normal((K, B, D)).astype(np.float32),
         "key": rng.standard_normal((K, S, D)).astype(np.float16),
         "value": rng.standard_normal((K, S, D)).astype(np.float16)}
    owner = np.full(S, -1)
    used = int(S * 0.9)
    owner[:used] = np.arange(used) % B
    mask = np.full((1, B, S + 1), -1e4, np.float32)
    mask[0, :, :S][owner[None, :] == np.arange(B)[:, None]] = 0.0
    mask[0, :, S] = 0.0
    a["mask"] = mask
    return a


def ours(kernel: kvattn.Kernel, a: dict, K: int = K, G: int = G):
    out = np.empty(a["q"].shape, np.float32)
    B, S = a["k_new"].shape[1], a["key"].shape[1]
    args = [kernel.user_data] + [a[n].ctypes.data for n in ("q", "k_new", "v_new", "key", "value")] + \
        [1, a["mask"].ctypes.data, out.ctypes.data, K, G, B, S, D]
    fn = kernel._lib.kvattn_compute
    return lambda: fn(*args) + 0 * out.size * len(a)  # keeps out and the inputs alive


def proto(lib: ctypes.CDLL, ctx: int, a: dict):
    out = np.empty(a["q"].shape, np.float32)
    B, S = a["k_new"].shape[1], a["key"].shape[1]
    mask = np.ascontiguousarray(a["mask"][:, :, :S])
    a["_proto_mask"] = mask
    args = [ctx] + [a[n].ctypes.data for n in ("q", "key", "value")] + [mask.ctypes.data, out.ctypes.data,
                                                                         K, G * B, B, S, D]
    fn = lib.kv_attention
    return lambda: fn(*args) + 0 * out.size * len(a)  # keeps out and the inputs alive


def time_calls(variants: dict, rounds: int, gap: float = 0.0) -> dict:
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm up: scratch, pools, caches
        for _ in range(20):
            fn()
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: np.percentile(np.array(t) * 1e6, [25, 50, 75]) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proto", help="the prototype's libkvattn.so (OpenMP)")
    p.add_argument("--shapes", default="1x640,8x640,8x4400", help="BxS,...")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--gap-us", type=float, default=0.0,
                   help="sleep between calls, as the other ops of a model do (idle workers then block)")
    p.add_argument("--library", help="libkvattn.so to time (default: the one next to kvattn.c)")
    p.add_argument("--threshold", action="store_true", help="time small calls, 1 thread against 2")
    args = p.parse_args()
    one, two = kvattn.load(1, args.library), kvattn.load(2, args.library)
    if args.threshold:
        two.set_serial_work(0)
        for k, g, B, S in [(12, 1, 1, 320), (12, 1, 1, 1024), (12, 1, 8, 640), (12, 1, 8, 1280), (12, 1, 8, 2048),
                           (12, 1, 8, 4400), (3, 3, 1, 1024), (3, 3, 8, 1024), (3, 3, 8, 2048), (3, 3, 8, 4400)]:
            a = inputs(B, S, k, g)
            work = k * g * (int((a["mask"][0] >= -1000).sum()))
            r = time_calls({"1": ours(one, a, k, g), "2": ours(two, a, k, g)}, args.rounds, args.gap_us * 1e-6)
            print(f"K{k} G{g} B{B} S{S} work {work:6d}: 1 thread {r['1'][1]:7.1f} us, 2 threads {r['2'][1]:7.1f} us")
        return
    plib = pctx = None
    if args.proto:
        plib = ctypes.CDLL(args.proto)
        plib.kv_context_new.restype, plib.kv_context_new.argtypes = ctypes.c_void_p, [ctypes.c_int]
        plib.kv_attention.restype = ctypes.c_int
        plib.kv_attention.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5
        pctx = plib.kv_context_new(2)
    print(f"K{K} G{G} D{D}, fp16 pools, {args.rounds} rounds; microseconds per call, median [quartiles]")
    for shape in args.shapes.split(","):
        B, S = map(int, shape.split("x"))
        a = inputs(B, S)
        variants = {"2 threads": ours(two, a), "1 thread": ours(one, a)}
        if plib:
            variants["proto OpenMP 2"] = proto(plib, pctx, a)
        r = time_calls(variants, args.rounds, args.gap_us * 1e-6)
        cells = "  ".join(f"{n}: {v[1]:7.1f} [{v[0]:.1f}-{v[2]:.1f}]" for n, v in r.items())
        print(f"B={B} S={S}: {cells}", flush=True)


if __name__ == "__main__":
    main()
