"""Per-op profile of one LiteRT decode step: where the time of a batch-8 step goes.

    python -m bench.profile_step --model-dir DIR [--precision int8] [--batch 8] [--cache 256]

A decode step of the service (`Decoder.step` in service/engine/litert_gpt2.py) invokes two
signatures: `decode` (the transformer blocks: one token per row over the key/value pool ->
`hidden` [B, E] and each layer's new keys and values) and then `head` (`hidden` -> `logits`
[B, V]: the final layer norm and the LM head's FULLY_CONNECTED). The profile covers both.

ai-edge-litert 2.3.0's Python API has no op profiler: the Interpreter takes
`experimental_force_delegate_node_profiling` but gives no way to read the events, and the
profiler of the C API (`LiteRtCompiledModelGetProfiler`) is not wrapped for Python. So each op
is timed alone, as a sub-graph of one op:

1. the `decode` signature runs once, then `head` on its `hidden` output, in an interpreter that
   keeps every intermediate tensor (`experimental_preserve_all_tensors`), which gives each op's
   real input values and shapes;
2. for each op of the two signatures' subgraphs, a one-op model is cut out of the flatbuffer
   (its constant inputs keep their buffers, int8 weights and quantization included; the others
   become inputs), loaded with the same op resolver and thread count as the whole step (XNNPACK
   delegates what it supports, as when serving), fed the captured inputs and invoked repeatedly;
3. the whole step (`decode` invoke then `head` invoke) is timed the same way (invoke only: the
   inputs of both are set once), so the report says how much of the step the ops account for.

Inside a step every weight and cache tensor is read once, and together they (about 160 MB at
batch 8, cache 256, DistilGPT2 int8) outgrow the CPU's caches; an op invoked over and over alone
would find its operands cached. So each op is timed twice: with a large buffer written before
every invoke (`--flush-mib`, not timed) and with warm caches. On DistilGPT2 the flushed sum came
within about 10% of the measured step, the warm one at about 60% of it.

Times are medians over `--repeats` invokes, less the cost of invoking an empty one-op model.
The table groups ops by type, and FULLY_CONNECTED also by weight shape (which matmul it is).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from service.model_files import litert_model_file

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The signatures a decode step invokes, in order; `head`'s input is `decode`'s `hidden` output.
STEP_SIGNATURES = ("decode", "head")


def _litert():
    from ai_edge_litert import interpreter as litert_interpreter
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    return litert_interpreter, schema, flatbuffer_utils


def decode_inputs(details: dict, batch: int, cache: int, model_dir: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one decode step: real token + position embeddings if the files are there,
    a mask that shows every cache slot, and caches of random keys and values."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, d in details.items():
        shape = [int(x) for x in d["shape_signature"]]
        if name == "embeds" or name.startswith("embed"):
            shape = [batch, 1, shape[-1]]
            emb, pos = model_dir / "embeddings.npy", model_dir / "positions.npy"
            if emb.is_file() and pos.is_file():
                wte, wpe = np.load(emb, mmap_mode="r"), np.load(pos, mmap_mode="r")
                ids = rng.integers(0, wte.shape[0], batch)
                value = (wte[ids] + wpe[cache % wpe.shape[0]])[:, None, :]
            else:
                value = rng.normal(0, 0.1, shape)
        elif name == "mask" or name.startswith("mask"):
            value = np.zeros([1, batch, batch * cache + 1])
        else:  # key_i / value_i: a pool [H, S, D] holding `cache` slots for each row
            value = rng.normal(0, 1.0, [shape[0], batch * cache, shape[2]])
        inputs[name] = np.ascontiguousarray(value, dtype=d["dtype"])
    return inputs


class CacheFlush:
    """Evicts the CPU caches by writing a buffer larger than them (not timed).

    Within a decode step every weight and every cache tensor is read once, and together they
    are far larger than the CPU's last-level cache, so each op starts from memory. An op invoked
    over and over alone would find its operands in cache instead; flushing before each invoke
    keeps its time the one it has inside the step.
    """

    def __init__(self, mib: int):
        self.buffer = np.zeros(mib * 2**20 // 8, dtype=np.int64) if mib > 0 else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer += 1


def _median_invoke_ms(invoke, repeats: int, flush=None, warmup: int = 3) -> float:
    for _ in range(warmup):
        invoke()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        invoke()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


class OneOpModels:
    """Cuts one-op models out of a LiteRT flatbuffer's subgraph."""

    def __init__(self, model_bytes: bytes):
        _, self.schema, fb = _litert()
        self.fb = fb
        self.model = fb.read_model_from_bytearray(bytearray(model_bytes))

    def subgraph_of(self, signature: str) -> int:
        for sig in self.model.signatureDefs or []:
            key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
            if key == signature:
                return sig.subgraphIndex
        raise SystemExit(f"the model has no signature {signature!r}")

    def op_name(self, op) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        builtin = self.fb.get_builtin_code_from_operator_code(code)
        if builtin == self.schema.BuiltinOperator.CUSTOM:
            return f"CUSTOM:{code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode}"
        return {v: k for k, v in vars(self.schema.BuiltinOperator).items() if not k.startswith("_")}[builtin]

    def is_constant(self, sg, tensor_index: int) -> bool:
        buf = self.model.buffers[sg.tensors[tensor_index].buffer]
        return buf is not None and buf.data is not None and len(buf.data) > 0

    def build(self, sg_index: int, op_index: int, shapes: dict[int, list[int]]) -> tuple[bytes, list[int]]:
        """A model holding op `op_index` alone; returns it and the original indices of its inputs."""
        S = self.schema
        sg = self.model.subgraphs[sg_index]
        op = sg.operators[op_index]
        model = S.ModelT()
        model.version = self.model.version
        model.operatorCodes = self.model.operatorCodes
        model.buffers = [S.BufferT()]
        sub = S.SubGraphT()
        sub.tensors, sub.inputs, sub.outputs = [], [], []
        remap: dict[int, int] = {}
        feeds: list[int] = []

        def add(index: int, is_input: bool) -> int:
            if index < 0:
                return index
            if index in remap:
                return remap[index]
            t = copy.copy(sg.tensors[index])
            if is_input and self.is_constant(sg, index):
                model.buffers.append(self.model.buffers[t.buffer])
                t.buffer = len(model.buffers) - 1
            else:
                model.buffers.append(S.BufferT())
                t.buffer = len(model.buffers) - 1
                t.shape = np.array(shapes[index], dtype=np.int32)
                t.shapeSignature = None
                if is_input:
                    sub.inputs.append(len(sub.tensors))
                    feeds.append(index)
            sub.tensors.append(t)
            remap[index] = len(sub.tensors) - 1
            return remap[index]

        new_op = copy.copy(op)
        new_op.inputs = [add(int(i), True) for i in op.inputs]
        new_op.outputs = [add(int(i), False) for i in op.outputs]
        sub.outputs = [remap[int(i)] for i in op.outputs]
        sub.operators = [new_op]
        model.subgraphs = [sub]
        return bytes(self.fb.convert_object_to_bytearray(model)), feeds


def profile(model_path: Path, model_dir: Path, batch: int, cache: int, threads: int, repeats: int,
            flush_mib: int = 256) -> dict:
    litert_interpreter, _, _ = _litert()
    flush = CacheFlush(flush_mib)
    Interpreter = litert_interpreter.Interpreter
    model_bytes = model_path.read_bytes()

    # The whole step, as the service runs it: `decode` then `head` (minus setting inputs: timed
    # invokes only).
    whole = Interpreter(model_content=model_bytes, num_threads=threads)
    runners = [whole.get_signature_runner(name) for name in STEP_SIGNATURES]
    inputs = decode_inputs(runners[0].get_input_details(), batch, cache, model_dir)
    hidden = runners[0](**inputs)["hidden"]  # resizes, allocates and sets the inputs
    runners[1](hidden=hidden)
    sg_whole = [r._subgraph_index for r in runners]  # noqa: SLF001 (no public way to invoke without copying inputs)

    def invoke_step() -> None:
        for index in sg_whole:
            whole._interpreter.Invoke(index)  # noqa: SLF001

    step_ms = _median_invoke_ms(invoke_step, repeats)
    step_cold_ms = _median_invoke_ms(invoke_step, repeats, flush)
    del whole, runners

    # Every intermediate tensor of one step, for the ops' inputs and shapes: per signature, its
    # subgraph's index, tensor shapes and tensor values.
    keep = Interpreter(model_content=model_bytes, num_threads=threads, experimental_preserve_all_tensors=True)
    cutter = OneOpModels(model_bytes)
    captured: dict[str, tuple[int, dict[int, list[int]], dict[int, np.ndarray]]] = {}
    feed = inputs
    for name in STEP_SIGNATURES:
        outputs = keep.get_signature_runner(name)(**feed)
        sg_index = cutter.subgraph_of(name)
        values: dict[int, np.ndarray] = {}
        for i in range(len(cutter.model.subgraphs[sg_index].tensors)):
            try:
                values[i] = keep.get_tensor(i, sg_index)
            except ValueError:
                pass  # a tensor the runtime never materialised (e.g. an optional one)
        captured[name] = (sg_index, {i: list(v.shape) for i, v in values.items()}, values)
        if name == "decode":
            feed = {"hidden": outputs["hidden"]}  # head's input: decode's hidden output
    del keep

    # What invoking a one-op model costs with next to nothing to do (a RESHAPE), cold and warm:
    # subtracted from every op timed the same way. Cold, it is tens of microseconds (the
    # interpreter's own data and the thread pool's wake-up); inside the step it is not paid per op.
    overhead_ms = _empty_invoke_ms(Interpreter, cutter, *captured["decode"], threads, repeats, flush)
    overhead_hot_ms = _empty_invoke_ms(Interpreter, cutter, *captured["decode"], threads, repeats, None)

    ops = []
    for signature, (sg_index, shapes, values) in captured.items():
        sg = cutter.model.subgraphs[sg_index]
        for k, op in enumerate(sg.operators):
            entry = {"signature": signature, "index": k, "op": cutter.op_name(op), "ms": None}
            entry["weights"] = [list(sg.tensors[int(i)].shape) for i in op.inputs
                                if int(i) >= 0 and cutter.is_constant(sg, int(i))]
            entry["out_shape"] = shapes.get(int(op.outputs[0])) if len(op.outputs) else None
            try:
                one = _one_op_interpreter(Interpreter, cutter, sg_index, k, shapes, values, threads)
                raw = _median_invoke_ms(one._interpreter.Invoke, repeats, flush)  # noqa: SLF001
                entry["ms"] = max(raw - overhead_ms, 0.0)
                hot = _median_invoke_ms(one._interpreter.Invoke, repeats)  # noqa: SLF001
                entry["hot_ms"] = max(hot - overhead_hot_ms, 0.0)
                del one
            except Exception as exc:  # an op that cannot stand alone is reported, not fatal
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            ops.append(entry)
    return {"model": str(model_path), "batch": batch, "cache": cache, "threads": threads, "repeats": repeats,
            "step_ms": step_ms, "step_cold_ms": step_cold_ms, "flush_mib": flush_mib,
            "invoke_overhead_ms": overhead_ms, "invoke_overhead_hot_ms": overhead_hot_ms, "ops": ops}


def _one_op_interpreter(Interpreter, cutter: OneOpModels, sg_index: int, k: int, shapes, values, threads):
    """Op k of the subgraph as a model of its own, allocated and fed its captured inputs."""
    content, feeds = cutter.build(sg_index, k, shapes)
    one = Interpreter(model_content=content, num_threads=threads)
    one.allocate_tensors()
    for detail, original in zip(one.get_input_details(), feeds):
        one.set_tensor(detail["index"], values[original])
    return one


def _empty_invoke_ms(Interpreter, cutter: OneOpModels, sg_index: int, shapes, values, threads, repeats, flush) -> float:
    """Invoke cost of the cheapest one-op model we can cut (a RESHAPE if there is one)."""
    sg = cutter.model.subgraphs[sg_index]
    candidates = [k for k, op in enumerate(sg.operators) if cutter.op_name(op) == "RESHAPE"] or [0]
    best = None
    for k in candidates[:3]:
        try:
            one = _one_op_interpreter(Interpreter, cutter, sg_index, k, shapes, values, threads)
            ms = _median_invoke_ms(one._interpreter.Invoke, repeats, flush)  # noqa: SLF001
            best = ms if best is None else min(best, ms)
        except Exception:  # noqa: BLE001
            continue
    return best or 0.0


def summarize(result: dict, top: int = 12) -> dict:
    """Tables (Markdown lines) by op type, by FULLY_CONNECTED weight shape, and the top ops."""
    ops = result["ops"]
    timed = [o for o in ops if o["ms"] is not None]
    total = sum(o["ms"] for o in timed) or 1e-9
    total_hot = sum(o.get("hot_ms") or 0.0 for o in timed)
    by_type: dict[str, list] = {}
    for o in timed:
        key = o["op"]
        if o["op"] == "FULLY_CONNECTED" and o["weights"]:
            key = f"FULLY_CONNECTED {'x'.join(map(str, o['weights'][0]))}"
        by_type.setdefault(key, []).append(o)
    rows = sorted(by_type.items(), key=lambda kv: -sum(o["ms"] for o in kv[1]))
    b, c, step = result["batch"], result["cache"], result["step_ms"]
    table = ["| op type (FULLY_CONNECTED by weight shape, out x in) | count | ms, caches flushed | % of op sum "
             "| ms, caches warm |", "| --- | --- | --- | --- | --- |"]
    for key, group in rows:
        ms = sum(o["ms"] for o in group)
        hot = sum(o.get("hot_ms") or 0.0 for o in group)
        table.append(f"| {key} | {len(group)} | {ms:.3f} | {100 * ms / total:.1f}% | {hot:.3f} |")
    table.append(f"| **sum of ops** | {len(timed)} | {total:.3f} | 100% | {total_hot:.3f} |")
    untimed = [o for o in ops if o["ms"] is None]
    notes = [
        f"Whole step (`decode` invoke + `head` invoke, inputs already set): {step:.2f} ms = "
        f"{b / step * 1000:.0f} tok/s at batch {b} before any host work ({result['step_cold_ms']:.2f} ms with caches "
        f"flushed first). The ops timed alone sum "
        f"to {total:.2f} ms with caches flushed before each ({100 * total / step:.0f}% of the step) and "
        f"{total_hot:.2f} ms with warm caches ({100 * total_hot / step:.0f}%); the "
        f"{'flushed' if abs(total - step) <= abs(total_hot - step) else 'warm'} column is the closer to the step. "
        f"{result['threads']} threads, median of {result['repeats']} invokes, less the invoke overhead of a one-op "
        f"model ({result['invoke_overhead_ms'] * 1000:.0f} µs flushed, "
        f"{result['invoke_overhead_hot_ms'] * 1000:.0f} µs warm) per op.",
    ]
    if untimed:
        notes.append(f"Not timed alone: {len(untimed)} ops ({', '.join(sorted({o['op'] for o in untimed}))}).")
    slow = sorted(timed, key=lambda o: -o["ms"])[:top]
    top_lines = ["| # | op | weights | output | ms |", "| --- | --- | --- | --- | --- |"]
    for o in slow:
        w = "; ".join("x".join(map(str, s)) for s in o["weights"]) or "–"
        out = "x".join(map(str, o["out_shape"] or [])) or "–"
        top_lines.append(f"| {o.get('signature', 'decode')} {o['index']} | {o['op']} | {w} | {out} | {o['ms']:.3f} |")
    title = (f"Per-op profile of one decode step (`decode` + `head` signatures) of `{Path(result['model']).name}`, "
             f"batch {b}, cache {c} slots (`python -m bench.profile_step`):")
    return {"title": title, "batch": b, "cache": c, "table": table, "top": top_lines, "notes": notes,
            "step_ms": step, "step_cold_ms": result["step_cold_ms"], "op_sum_ms": total,
            "op_sum_hot_ms": total_hot,
            "by_type": {k: {"count": len(v), "ms": sum(o["ms"] for o in v)} for k, v in rows}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True, help="directory holding decoder.<precision>.tflite")
    p.add_argument("--precision", default="int8", choices=("int8", "fp32"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache", type=int, default=256, help="cache slots per row (the pool the step attends over holds batch x this)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="interpreter threads (default: the cores, as the service's NUM_THREADS default)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--flush-mib", type=int, default=256,
                   help="MiB written between timed invokes to evict the CPU caches (0: time with warm caches)")
    p.add_argument("--json", type=Path, help="also write the result and its tables here")
    args = p.parse_args(argv)
    model_path = args.model_dir / litert_model_file(args.precision)
    if not model_path.is_file():
        raise SystemExit(f"{model_path} is missing (scripts/convert_model.py --model-dir writes it)")
    result = profile(model_path, args.model_dir, args.batch, args.cache, args.threads, args.repeats, args.flush_mib)
    summary = summarize(result)
    print("\n".join([summary["title"], "", *summary["table"], "", "Slowest ops:", "", *summary["top"], "",
                     *summary["notes"]]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({**summary, "raw": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
