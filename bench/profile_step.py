"""Per-op profile of one LiteRT decode step: where the time of a batch-8 step goes.

    python -m bench.profile_step --model-dir DIR [--precision int8] [--batch 8] [--cache 256]

A decode step of the service (`Decoder.step` in service/engine/litert_gpt2.py) invokes two
signatures: `decode` (the transformer blocks: one token per row over the key/value pool ->
`hidden` [B, E] and each layer's new keys and values) and then `head` (`hidden` -> `logits`
[B, V]: the final layer norm and the LM head's FULLY_CONNECTED). The profile covers both.
Each layer's attention in `decode` is the custom op `KVAttention` (service/engine/native/kvattn.c),
which only the C API runs (`Program` in service/engine/litert_runtime.py, the kernel registered);
the Python Interpreter cannot resolve it.

ai-edge-litert 2.3.0's Python API has no op profiler: the Interpreter takes
`experimental_force_delegate_node_profiling` but gives no way to read the events, and the
profiler of the C API (`LiteRtCompiledModelGetProfiler`) is not wrapped for Python. So each op
is timed alone, as a sub-graph of one op:

1. the whole step (`decode` run then `head` run, through `Program` with the kernel registered,
   as the service runs it) is timed with its inputs set once (runs only), so the report says
   how much of the step the ops account for. The inputs are a step's: a pool of `--cache` slots
   per row of finite random values in the pool's declared dtype (float16 in the int8 file), and
   a mask that shows each row its own slots only, as the service's does (the kernel leaves out
   masked slots, so the mask sets the attention's work);
2. for each op of the two signatures' subgraphs, in order, a one-op model is cut out of the
   flatbuffer (its constant inputs keep their buffers, int8 weights and quantization included;
   the others become inputs) and run on the values the earlier ops gave, which gives each op's
   real input values and shapes; KVAttention is computed by the kernel's own C code
   (`Kernel.attention`). This op-by-op `hidden` must match the whole step's within 1e-4 of its
   largest value, or the profile stops: the ops would not be fed the step's values. (It matched
   exactly, int8 included, on the tiny test model and on DistilGPT2's shape: each op runs the
   same kernel, dynamic-range quantization of its input included, alone as in the graph.)
3. each one-op model is invoked repeatedly, fed those inputs: KVAttention's through `Program`
   with the kernel registered (so its time includes LiteRT's call path), the others in an
   Interpreter with the same op resolver and thread count as the whole step (XNNPACK delegates
   what it supports, as when serving).

Inside a step every weight and cache tensor is read once, and together they (about 160 MB at
batch 8, cache 256, DistilGPT2 int8) outgrow the CPU's caches; an op invoked over and over alone
would find its operands cached. So each op is timed twice: with a large buffer written before
every invoke (`--flush-mib`, not timed) and with warm caches; the report says which sum comes
closer to the measured step. On DistilGPT2 int8 at batch 8, on a quiet machine, the flushed
sum came to 109% of the step at cache 640 and 104% at cache 4400, the warm one to 38% and 84%;
beside a busy process the flushed sum at cache 640 came to 201%: compare quiet runs only.

Times are medians over `--repeats` invokes, less the cost of invoking an empty one-op model
(a RESHAPE) the same way: in an Interpreter for most ops, through `Program` for KVAttention.
The table groups ops by type, and FULLY_CONNECTED also by weight shape (which matmul it is);
KVAttention is a group of its own (`CUSTOM:KVAttention`).
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


MASKED = -1e4  # the mask's value for a slot a row does not see (the service's, litert_gpt2.MASKED)


def decode_inputs(types: dict[str, tuple[np.dtype, list[int]]], batch: int, cache: int, model_dir: Path,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one decode step, by name, from each input's declared (dtype, shape): real token
    (+ position) embeddings if the files are there, a pool [H, batch x cache, D] per key/value
    input of finite random values in its declared dtype (float16 in the int8 file), and a mask
    that gives each row its own `cache` slots of the pool (row b: slots b x cache on; 0 there,
    MASKED elsewhere, 0 in the last column, the new token's), as the service's is. The mask
    matters to the time: the KVAttention kernel leaves out the slots a row's mask hides."""
    rng = np.random.default_rng(seed)
    rotary = "rope" in types
    positions = model_dir / "positions.npy"
    inputs = {}
    for name, (dtype, shape) in types.items():
        if name == "embeds" or name.startswith("embed"):
            shape = [batch, 1, shape[-1]]
            emb = model_dir / "embeddings.npy"
            if emb.is_file() and (rotary or positions.is_file()):
                wte = np.load(emb, mmap_mode="r")
                value = wte[rng.integers(0, wte.shape[0], batch)]
                if not rotary:  # GPT-2 adds its learned position embedding on the host
                    wpe = np.load(positions, mmap_mode="r")
                    value = value + wpe[cache % wpe.shape[0]]
                value = value[:, None, :]
            else:
                value = rng.normal(0, 0.1, shape)
        elif name == "rope":  # a rotary model's cos and sin of each row's position [B, 2D]
            if positions.is_file():
                table = np.load(positions, mmap_mode="r")
                value = np.repeat(table[cache % table.shape[0]][None], batch, axis=0)
            else:
                angle = rng.uniform(0, np.pi, [batch, shape[-1] // 2])
                value = np.concatenate([np.cos(angle), np.sin(angle)], axis=-1)
        elif name == "mask" or name.startswith("mask"):
            value = np.full([1, batch, batch * cache + 1], MASKED)
            for b in range(batch):
                value[0, b, b * cache:(b + 1) * cache] = 0
            value[..., -1] = 0
        else:  # key_i / value_i: a pool [H, S, D] holding `cache` slots for each row
            value = rng.normal(0, 1.0, [shape[0], batch * cache, shape[2]])
        inputs[name] = np.ascontiguousarray(value, dtype=dtype)
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

    def signature_tensors(self, signature: str) -> tuple[dict[str, int], dict[str, int]]:
        """A signature's inputs and outputs: name -> tensor index in its subgraph."""
        for sig in self.model.signatureDefs or []:
            key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
            if key == signature:
                def names(maps):
                    return {(m.name.decode() if isinstance(m.name, bytes) else m.name): int(m.tensorIndex)
                            for m in maps or []}
                return names(sig.inputs), names(sig.outputs)
        raise SystemExit(f"the model has no signature {signature!r}")

    def build(self, sg_index: int, op_index: int, shapes: dict[int, list[int]],
              signature: str | None = None) -> tuple[bytes, list[int]]:
        """A model holding op `op_index` alone; returns it and the original indices of its inputs.

        Its non-constant tensors take their shapes from `shapes` (an output missing there keeps
        the file's shape: the runtime sets it when the op is prepared). With `signature`, the
        model has one signature of that name, inputs `in0`.. (in the order of the returned
        indices) and outputs `out0`.. (the op's): what the C API (`Program`) runs."""
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
                if index in shapes or is_input:
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
        if signature is not None:
            def tensor_map(name: str, index: int):
                m = S.TensorMapT()
                m.name, m.tensorIndex = name, index
                return m

            sig = S.SignatureDefT()
            sig.signatureKey, sig.subgraphIndex = signature, 0
            sig.inputs = [tensor_map(f"in{j}", i) for j, i in enumerate(sub.inputs)]
            sig.outputs = [tensor_map(f"out{j}", i) for j, i in enumerate(sub.outputs)]
            model.signatureDefs = [sig]
        return bytes(self.fb.convert_object_to_bytearray(model)), feeds


KV_ATTENTION = "CUSTOM:KVAttention"  # the decode attention's op, as `OneOpModels.op_name` names it
# How close the op-by-op `hidden` must come to the whole step's, relative to the largest |hidden|
# (see `check_hidden`), for fp32 and int8 files alike: it has come out exactly equal for both.
HIDDEN_TOLERANCE = 1e-4


class OneOp:
    """One op cut out as a model of its own, its inputs set: `invoke()` runs it, `outputs()`
    gives its outputs (in the op's order). KVAttention runs through the C API (`Program`) with
    the kernel registered, as when serving; every other op in a Python Interpreter with the same
    op resolver and thread count as the whole step (XNNPACK delegates what it supports);
    `through_program` runs any op through the C API."""

    def __init__(self, cutter: OneOpModels, sg_index: int, k: int, shapes, values, threads: int, kernel, work: Path,
                 through_program: bool = False):
        Interpreter = _litert()[0].Interpreter
        self.program = self.signature = self.interpreter = None
        op = cutter.model.subgraphs[sg_index].operators[k]
        if through_program or cutter.op_name(op).startswith("CUSTOM:"):
            from service.engine.litert_runtime import CustomOp, Program

            content, feeds = cutter.build(sg_index, k, shapes, signature="op")
            path = work / f"op-{sg_index}-{k}.tflite"
            path.write_bytes(content)
            self.program = Program(path, threads, custom_ops=[CustomOp(kernel.name, kernel.kernel, kernel.user_data)])
            path.unlink()
            self.signature = self.program.signature("op", reuse=False)
            self.signature.resize({f"in{j}": list(values[i].shape) for j, i in enumerate(feeds)})
            for j, i in enumerate(feeds):
                self.signature.inputs[f"in{j}"][...] = values[i]
            self.invoke = self.signature.run
        else:
            content, feeds = cutter.build(sg_index, k, shapes)
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
            self.interpreter.allocate_tensors()
            for detail, original in zip(self.interpreter.get_input_details(), feeds):
                self.interpreter.set_tensor(detail["index"], values[original])
            self.invoke = self.interpreter._interpreter.Invoke  # noqa: SLF001 (invoke without copying inputs)

    def outputs(self) -> list[np.ndarray]:
        if self.signature is not None:
            return [self.signature.outputs[name].copy() for name in self.signature.output_names]
        return [self.interpreter.get_tensor(d["index"]) for d in self.interpreter.get_output_details()]

    def close(self) -> None:
        self.signature = self.interpreter = None
        if self.program is not None:
            self.program.close()
            self.program = None


def evaluate(cutter: OneOpModels, signature: str, feed: dict[str, np.ndarray], threads: int, kernel,
             work: Path) -> tuple[int, dict[int, np.ndarray], dict[str, np.ndarray]]:
    """Run a signature's subgraph op by op, in order, each op as a one-op model fed the values
    the earlier ops gave (KVAttention by `kernel.attention`, the same C code the op runs).
    Returns the subgraph's index, every tensor's value by index, and the signature's outputs."""
    sg_index = cutter.subgraph_of(signature)
    sg = cutter.model.subgraphs[sg_index]
    input_tensors, output_tensors = cutter.signature_tensors(signature)
    values = {input_tensors[name]: value for name, value in feed.items()}
    for k, op in enumerate(sg.operators):
        name = cutter.op_name(op)
        missing = [int(i) for i in op.inputs if int(i) >= 0 and int(i) not in values
                   and not cutter.is_constant(sg, int(i))]
        if missing:
            raise RuntimeError(f"{signature} op {k} ({name}) reads tensors no earlier op wrote: {missing}")
        if name == KV_ATTENTION:
            args = [np.ascontiguousarray(values[int(i)]) for i in op.inputs]
            outs = [kernel.attention(*args)]
        elif name.startswith("CUSTOM:"):
            raise RuntimeError(f"{signature} op {k} is {name}, which this profile cannot evaluate")
        else:
            one = OneOp(cutter, sg_index, k, {i: list(v.shape) for i, v in values.items()}, values, threads, kernel,
                        work)
            one.invoke()
            outs = one.outputs()
            one.close()
        for i, value in zip(op.outputs, outs):
            values[int(i)] = value
    return sg_index, values, {name: values[i] for name, i in output_tensors.items()}


def check_hidden(op_by_op: np.ndarray, whole: np.ndarray, tolerance: float) -> float:
    """The largest difference of the op-by-op `hidden` from the whole step's, relative to the
    whole step's largest |value|; raises if it is over `tolerance` (or the shapes differ): the
    op inputs would then not be the step's."""
    if op_by_op.shape != whole.shape:
        raise RuntimeError(f"op-by-op hidden has shape {op_by_op.shape}, the whole step's {whole.shape}")
    scale = float(np.max(np.abs(whole))) or 1.0
    diff = float(np.max(np.abs(op_by_op.astype(np.float64) - whole))) / scale
    if not np.isfinite(diff) or diff > tolerance:
        raise RuntimeError(f"the op-by-op evaluation does not reproduce the step: max |hidden - step's hidden| "
                           f"is {diff:.2e} of max |hidden| (tolerance {tolerance:.0e})")
    return diff


def profile(model_path: Path, model_dir: Path, batch: int, cache: int, threads: int, repeats: int,
            flush_mib: int = 256, tolerance: float = HIDDEN_TOLERANCE) -> dict:
    import tempfile

    from service.engine.litert_runtime import CustomOp, Program
    from service.engine.native import kvattn

    flush = CacheFlush(flush_mib)
    kernel = kvattn.load(threads)
    cutter = OneOpModels(model_path.read_bytes())

    # The whole step, as the service runs it: `decode` then `head` through the C API with the
    # kernel registered (minus setting inputs: timed runs only).
    program = Program(model_path, threads, custom_ops=[CustomOp(kernel.name, kernel.kernel, kernel.user_data)])
    decode, head = (program.signature(name, reuse=False) for name in STEP_SIGNATURES)
    inputs = decode_inputs({n: (decode.dtype(n), decode.declared(n)) for n in decode.input_names}, batch, cache,
                           model_dir)
    decode.resize({name: list(value.shape) for name, value in inputs.items()})
    for name, value in inputs.items():
        decode.inputs[name][...] = value
    decode.run()
    head.resize({"hidden": list(decode.outputs["hidden"].shape)})
    head.inputs["hidden"][...] = decode.outputs["hidden"]
    head.run()
    step_hidden = decode.outputs["hidden"].copy()

    def invoke_step() -> None:
        decode.run()
        head.run()

    step_ms = _median_invoke_ms(invoke_step, repeats)
    step_cold_ms = _median_invoke_ms(invoke_step, repeats, flush)
    del decode, head
    program.close()

    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        work = Path(tmp)
        # Every intermediate tensor of one step, for the ops' inputs and shapes: each signature
        # evaluated op by op (per signature: its subgraph's index, tensor shapes and values).
        captured: dict[str, tuple[int, dict[int, list[int]], dict[int, np.ndarray]]] = {}
        feed = inputs
        for name in STEP_SIGNATURES:
            sg_index, values, outputs = evaluate(cutter, name, feed, threads, kernel, work)
            captured[name] = (sg_index, {i: list(v.shape) for i, v in values.items()}, values)
            if name == "decode":
                hidden_diff = check_hidden(outputs["hidden"], step_hidden, tolerance)
                feed = {"hidden": outputs["hidden"]}  # head's input: decode's hidden output

        # What invoking a one-op model costs with next to nothing to do (a RESHAPE), cold and
        # warm, in an Interpreter and through the C API: subtracted from every op run the same
        # way. Cold, it is tens of microseconds (the runtime's own data and the thread pool's
        # wake-up); inside the step it is not paid per op.
        decode_capture = captured["decode"]
        overhead = {(runtime, cold): _empty_invoke_ms(cutter, *decode_capture, threads, repeats,
                                                      flush if cold else None, kernel, work, runtime)
                    for runtime in ("interpreter", "program") for cold in (True, False)}

        ops = []
        for signature, (sg_index, shapes, values) in captured.items():
            sg = cutter.model.subgraphs[sg_index]
            for k, op in enumerate(sg.operators):
                entry = {"signature": signature, "index": k, "op": cutter.op_name(op), "ms": None}
                entry["weights"] = [list(sg.tensors[int(i)].shape) for i in op.inputs
                                    if int(i) >= 0 and cutter.is_constant(sg, int(i))]
                entry["out_shape"] = shapes.get(int(op.outputs[0])) if len(op.outputs) else None
                runtime = "program" if entry["op"].startswith("CUSTOM:") else "interpreter"
                try:
                    one = OneOp(cutter, sg_index, k, shapes, values, threads, kernel, work)
                    raw = _median_invoke_ms(one.invoke, repeats, flush)
                    entry["ms"] = max(raw - overhead[runtime, True], 0.0)
                    hot = _median_invoke_ms(one.invoke, repeats)
                    entry["hot_ms"] = max(hot - overhead[runtime, False], 0.0)
                    one.close()
                except Exception as exc:  # an op that cannot stand alone is reported, not fatal
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                ops.append(entry)
    if kernel.errors():
        raise RuntimeError(f"the KVAttention kernel failed {kernel.errors()} calls (it wrote zeros): the times "
                           "are not the step's")
    return {"model": str(model_path), "batch": batch, "cache": cache, "threads": threads, "repeats": repeats,
            "step_ms": step_ms, "step_cold_ms": step_cold_ms, "flush_mib": flush_mib,
            "invoke_overhead_ms": overhead["interpreter", True],
            "invoke_overhead_hot_ms": overhead["interpreter", False],
            "program_overhead_ms": overhead["program", True], "program_overhead_hot_ms": overhead["program", False],
            "hidden_max_diff": hidden_diff, "hidden_tolerance": tolerance, "ops": ops}


def _empty_invoke_ms(cutter: OneOpModels, sg_index: int, shapes, values, threads, repeats, flush, kernel, work,
                     runtime: str) -> float:
    """Invoke cost of the cheapest one-op model we can cut (a RESHAPE if there is one), in an
    Interpreter (`runtime` "interpreter") or through the C API ("program")."""
    sg = cutter.model.subgraphs[sg_index]
    candidates = [k for k, op in enumerate(sg.operators) if cutter.op_name(op) == "RESHAPE"] or [0]
    best = None
    for k in candidates[:3]:
        try:
            one = OneOp(cutter, sg_index, k, shapes, values, threads, kernel, work, runtime == "program")
            ms = _median_invoke_ms(one.invoke, repeats, flush)
            one.close()
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
        f"Whole step (`decode` run + `head` run through the C API, the kernel registered, inputs already set): "
        f"{step:.2f} ms = "
        f"{b / step * 1000:.0f} tok/s at batch {b} before any host work ({result['step_cold_ms']:.2f} ms with caches "
        f"flushed first). The ops timed alone sum "
        f"to {total:.2f} ms with caches flushed before each ({100 * total / step:.0f}% of the step) and "
        f"{total_hot:.2f} ms with warm caches ({100 * total_hot / step:.0f}%); the "
        f"{'flushed' if abs(total - step) <= abs(total_hot - step) else 'warm'} column is the closer to the step. "
        f"{result['threads']} threads, median of {result['repeats']} invokes, less the invoke overhead of a one-op "
        f"model ({result['invoke_overhead_ms'] * 1000:.0f} µs flushed, "
        f"{result['invoke_overhead_hot_ms'] * 1000:.0f} µs warm) per op; KVAttention runs through the C API "
        f"with the kernel registered, less that path's overhead ({result['program_overhead_ms'] * 1000:.0f} µs "
        f"flushed, {result['program_overhead_hot_ms'] * 1000:.0f} µs warm).",
        f"The ops' inputs come from evaluating the step op by op; its `hidden` is within "
        f"{result['hidden_max_diff']:.1e} of max |hidden| of the whole step's (tolerance "
        f"{result['hidden_tolerance']:.0e}).",
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
