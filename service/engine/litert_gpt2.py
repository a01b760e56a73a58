"""The LiteRT backend: GPT-2 on TensorFlow Lite's runtime, with no TensorFlow imported.

The model file (made by `scripts/convert_model.py`) has two signatures over one set of weights:
`prefill` runs one prompt with no cache and returns its keys and values; `decode` runs one token
for each row of the batch over a key/value cache and returns only that token's keys and values.
The cache lives in the decode signature's own input tensors, which the host reads and writes
through numpy views (no copy per call: copying the cache in and out of each call costs more than
the step itself at batch 8). After each step the host writes the new slot and opens it in the
additive attention mask.

Every row keeps its own positions (no left padding): a row's prompt fills slots 0..n-1 and each
new token the next slot, so a prompt is prefilled at its own length and a row's numbers are the
same whatever shares its batch. Token and position embeddings are looked up on the host (GATHER
is not delegated to XNNPACK).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from service.engine.base import DecodeBatch, Engine, GenerationRow, RowUpdate, TokenLogprob
from service.engine.sampling import next_token, token_logprob
from service.model_files import LITERT_META, litert_model_file

log = logging.getLogger(__name__)

MASKED = -1e4  # transformers' TF GPT-2 mask value
MADV_DONTNEED = 4


class Decoder:
    """One LiteRT model file, and the key/value cache of the batch it decodes.

    Contract: `arrange(sources, C)` makes the batch's rows (kept rows and empty new ones) with C
    slots each; `prefill(b, ids)` fills empty row b's first len(ids) slots (no logits: a prompt's
    last token goes through `step`); `step(ids)` puts one token per row into each row's next
    slot and returns the logits after it (no row's slots may be full).
    """

    def __init__(self, model_path: Path, embeddings: Rows, positions: np.ndarray, num_threads: int):
        self._model_path = model_path.resolve()
        self._interpreter = Interpreter(model_path=str(self._model_path), num_threads=num_threads)
        self._runtime = self._interpreter._interpreter  # the wrapper: per-signature views and calls
        self._embeddings = embeddings
        self._positions = positions
        self._prefill = self._signature("prefill")
        self._decode = self._signature("decode")
        key = self._runtime.TensorSizeSignature(self._decode.inputs["key_0"], self._decode.subgraph)
        self.n_head, self.head_dim = int(key[1]), int(key[3])
        self.n_layer = sum(1 for name in self._decode.inputs if name.startswith("key_"))
        self.batch_size = 0
        self.cache_size = 0
        self.lengths = np.zeros([0], np.int64)  # filled slots per row
        self.last_arrange_seconds = 0.0  # what the last `arrange` and `step` took
        self.last_step_seconds = 0.0

    def _signature(self, name: str) -> _Signature:
        runner = self._interpreter.get_signature_runner(name)
        return _Signature(self._runtime.GetSubgraphIndexFromSignature(name),
                          {n: d["index"] for n, d in runner.get_input_details().items()},
                          {n: d["index"] for n, d in runner.get_output_details().items()})

    # --- the batch's cache -------------------------------------------------------------------

    def arrange(self, sources: Sequence[int | None], cache_size: int) -> None:
        """Make the batch `sources` long with `cache_size` slots a row: position j takes the cache
        of current row `sources[j]`, or starts empty where it is None.

        Resizing reallocates the signature's tensors (their contents are lost), so the kept rows'
        filled slots are copied out and back; only filled slots are copied and every other slot
        is zeroed (masked slots must hold finite values: the mask is added, not selected)."""
        started = time.perf_counter()
        kept = [s for s in sources if s is not None]
        filled = int(self.lengths[kept].max(initial=0)) if kept else 0
        if filled > cache_size:
            raise ValueError(f"a row holds {filled} slots, more than a cache of {cache_size}")
        names = self._cache_names()
        saved = {name: self._view(self._decode, "inputs", name)[kept, :, :filled] for name in names} if kept else {}
        saved_mask = self._view(self._decode, "inputs", "mask")[kept, :, :, :filled] if kept else None
        lengths = np.array([self.lengths[s] if s is not None else 0 for s in sources], np.int64)
        self._resize_decode(len(sources), cache_size)
        at = [j for j, s in enumerate(sources) if s is not None]
        new = [j for j, s in enumerate(sources) if s is None]
        for name in names:
            cache = self._view(self._decode, "inputs", name)
            cache[:, :, filled:] = 0
            if at:
                cache[at, :, :filled] = saved[name]
            if new:
                cache[new, :, :filled] = 0
        mask = self._view(self._decode, "inputs", "mask")
        mask[...] = MASKED
        mask[..., cache_size] = 0  # the new token always sees itself
        if at:
            mask[at, :, :, :filled] = saved_mask
        self.lengths = lengths
        self.last_arrange_seconds = time.perf_counter() - started

    def clear_row(self, row: int) -> None:
        """Empty row `row` in place, for a new row to be prefilled there (its old slots stay
        finite, and masked)."""
        mask = self._view(self._decode, "inputs", "mask")
        mask[row] = MASKED
        mask[row, ..., self.cache_size] = 0
        self.lengths[row] = 0

    def _resize_decode(self, batch_size: int, cache_size: int) -> None:
        heads, head_dim = self.n_head, self.head_dim
        shapes = {name: [batch_size, heads, cache_size, head_dim] for name in self._cache_names()}
        shapes["mask"] = [batch_size, 1, 1, cache_size + 1]
        shapes["embeds"] = [batch_size, 1, self._embeddings.shape[1]]
        self._resize(self._decode, shapes)
        self.batch_size, self.cache_size = batch_size, cache_size

    def _cache_names(self) -> list[str]:
        return [f"{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")]

    # --- the two calls -------------------------------------------------------------------------

    def prefill(self, row: int, ids: Sequence[int]) -> None:
        n = len(ids)
        if n == 0:
            return
        if n > self.cache_size:
            raise ValueError(f"a prompt of {n} tokens does not fit a cache of {self.cache_size} slots")
        causal = np.triu(np.full([n, n], MASKED, np.float32), k=1)
        self._resize(self._prefill, {"embeds": [1, n, self._embeddings.shape[1]], "mask": [1, 1, n, n]})
        self._view(self._prefill, "inputs", "embeds")[0] = self._embed(np.asarray(ids), np.arange(n))
        self._view(self._prefill, "inputs", "mask")[0, 0] = causal
        self._invoke(self._prefill)
        for name in self._cache_names():
            self._view(self._decode, "inputs", name)[row, :, :n] = self._view(self._prefill, "outputs", name)[0]
        self._view(self._decode, "inputs", "mask")[row, 0, 0, :n] = 0
        self.lengths[row] = n

    def step(self, ids: np.ndarray) -> np.ndarray:
        """One token per row (in batch order) -> logits [batch, vocab] (a copy)."""
        started = time.perf_counter()
        at = self.lengths
        if at.max(initial=0) >= self.cache_size:
            raise ValueError("a row's cache is full")
        self._view(self._decode, "inputs", "embeds")[:, 0] = self._embed(ids, at)
        self._invoke(self._decode)
        rows = np.arange(self.batch_size)
        for name in self._cache_names():
            self._view(self._decode, "inputs", name)[rows, :, at] = self._view(self._decode, "outputs", name)[:, :, 0]
        self._view(self._decode, "inputs", "mask")[rows, 0, 0, at] = 0
        self.lengths = at + 1
        logits = self._view(self._decode, "outputs", "logits").copy()
        self.last_step_seconds = time.perf_counter() - started
        return logits

    def _embed(self, ids: Sequence[int], positions: np.ndarray) -> np.ndarray:
        return self._embeddings[ids] + self._positions[positions]

    # --- the interpreter -----------------------------------------------------------------------

    def release_file_pages(self) -> int:
        """Drop this process's resident pages of the mapped model file; returns bytes released.

        The runtime maps the .tflite file and XNNPACK packs its weights into memory of its own at
        the first allocation, after which the mapped pages are read only if a call needs them
        again (they then fault back in from the file). Without this, the int8 model's weights are
        resident twice (madvise(2), MADV_DONTNEED on a read-only file mapping)."""
        return _drop_mapped_pages(self._model_path)

    def _resize(self, signature: _Signature, shapes: dict[str, list[int]]) -> None:
        """Give inputs new shapes; reallocating moves tensors, so views are taken afresh after."""
        if signature.shapes == shapes:
            return
        for name, shape in shapes.items():
            self._runtime.ResizeInputTensor(signature.inputs[name], np.array(shape, np.int32), False,
                                            signature.subgraph)
        self._runtime.AllocateTensors(signature.subgraph)
        signature.shapes = shapes

    def _invoke(self, signature: _Signature) -> None:
        self._runtime.Invoke(signature.subgraph)

    def _view(self, signature: _Signature, side: str, name: str) -> np.ndarray:
        """A numpy view of a signature's tensor: valid until that signature is reallocated."""
        index = (signature.inputs if side == "inputs" else signature.outputs)[name]
        return self._runtime.tensor(self._interpreter, index, signature.subgraph)


@dataclass
class _Signature:
    """A signature's subgraph, its tensors' indices by name, and the input shapes allocated."""

    subgraph: int
    inputs: dict[str, int]
    outputs: dict[str, int]
    shapes: dict[str, list[int]] | None = None


class LiteRTGPT2Engine(Engine):
    """A GPT-2-family model served from the LiteRT files in a model directory."""

    backend = "litert"

    def __init__(self, model_dir: Path, *, precision: str = "auto", max_batch_size: int = 8,
                 num_threads: int = 0, smallest_cache: int = 128):
        meta = json.loads((model_dir / LITERT_META).read_text())
        gate = meta["quality"]
        self.precision = resolve_precision(precision, meta)
        log.info("int8 quality gate at conversion: %s", gate["reason"])
        if precision == "int8" and not gate["int8_enabled"]:
            log.warning("serving int8 although the quality gate rejected it (%s)", gate["reason"])
        self.eos_id = int(meta["eos_token_id"])
        self.context_window = int(meta["n_positions"])
        self.max_batch_size = max_batch_size
        self.cache_sizes = cache_buckets(smallest_cache, self.context_window)
        self._tokenizer = load_tokenizer(model_dir)
        embeddings = Rows(model_dir / meta["embeddings"])
        self.vocab_size = int(embeddings.shape[0])
        positions = np.load(model_dir / meta["positions"])
        self._threads = num_threads or len(os.sched_getaffinity(0))
        self._model_path = model_dir / litert_model_file(self.precision)
        self._embeddings, self._positions = embeddings, positions
        self.decoder = Decoder(self._model_path, embeddings, positions, self._threads)
        self._scorer: Decoder | None = None  # prompt_logprobs' own decoder, made on first use
        self._scorer_lock = threading.Lock()
        self.compactions = 0

    # --- Engine interface -------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids or [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def warmup(self) -> None:
        """Run a short batch through both signatures (XNNPACK packs the weights on first use), then
        let go of the model file's pages, which the packed copy has replaced."""
        started = time.monotonic()
        rows = [GenerationRow((self.eos_id, self.eos_id), 2)] * self.max_batch_size
        self.generate(rows)
        released = self.decoder.release_file_pages()
        log.info("warm-up ran %s (%s) in %.1f s; %.0f MiB of mapped model file released", self.backend,
                 self.precision, time.monotonic() - started, released / 2**20)

    def new_batch(self) -> LiteRTBatch:
        return LiteRTBatch(self)

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
        """Teacher-forced through the `decode` signature, one token a call, on a second decoder
        made on first use: the first one belongs to the scheduler's batch, and `prefill` returns
        no logits. It costs a decode call per prompt token, and its own packed weights (the
        model file's size again) once used."""
        with self._scorer_lock:
            if self._scorer is None:
                self._scorer = Decoder(self._model_path, self._embeddings, self._positions, self._threads)
            scorer = self._scorer
            scorer.arrange([None], self.cache_size_for(len(prompt_ids)))
            out: list[TokenLogprob | None] = [None]
            for i in range(len(prompt_ids) - 1):
                logits = scorer.step(np.array([prompt_ids[i]], np.int64))[0]
                out.append(token_logprob(logits, prompt_ids[i + 1], top))
            return out

    def cache_size_for(self, slots: int) -> int:
        return next(c for c in self.cache_sizes if c >= slots)


class LiteRTBatch(DecodeBatch):
    """Rows decoding together in the engine's one decoder (one batch at a time per engine).

    Each `step` is one decode call: one token a row. The batch's cache is the smallest bucket
    that holds the rows' filled slots: attention reads every allocated slot at every step, so a
    cache sized for the rows' final lengths would make each step pay for slots nothing has
    filled yet. Changing the shape (more rows, fewer, a larger bucket) rearranges the cache, a
    copy of the filled slots. A row that leaves becomes a hole that the next joining row takes
    in place (a client answered tends to come back). A hole costs a row's share of every call;
    it is compacted away once the holes have cost, in measured call time, what the last
    rearrangement cost (the ski-rental rule: never pay more than twice the better choice in
    hindsight).
    """

    def __init__(self, engine: LiteRTGPT2Engine):
        self._engine = engine
        self._decoder = engine.decoder
        self._keys: list[Hashable | None] = []  # per batch position; None is a hole
        self._rows: list[GenerationRow | None] = []
        self._generated: list[int] = []  # new tokens so far, per position
        self._history: list[list[int] | None] = []  # prompt + new tokens, for rows with a repetition penalty
        self._next = np.zeros([0], np.int64)  # the token each position feeds to the next step
        self._hole_cost = 0.0  # seconds of calls spent on holes since the last rearrangement

    @property
    def keys(self) -> list[Hashable]:
        return [key for key in self._keys if key is not None]

    def extend(self, entries: Sequence[tuple[Hashable, GenerationRow]]) -> None:
        if not entries:
            return
        if len(self.keys) + len(entries) > self._engine.max_batch_size:
            raise ValueError(f"a batch holds at most {self._engine.max_batch_size} rows")
        # Room for every prompt, and for the next step's token.
        cache_size = self._engine.cache_size_for(max([len(row.prompt_ids) for _, row in entries]
                                                      + [self._filled() + 1]))
        holes = self._holes()
        if len(holes) < len(entries) or cache_size != self._decoder.cache_size:
            self._rearrange(cache_size, extra=len(entries))
            holes = self._holes()
        for b, (key, row) in zip(holes, entries):
            self._decoder.clear_row(b)
            self._decoder.prefill(b, row.prompt_ids[:-1])
            self._keys[b], self._rows[b], self._generated[b] = key, row, 0
            self._history[b] = list(row.prompt_ids) if row.repetition_penalty != 1.0 else None
            self._next[b] = row.prompt_ids[-1]
        if not self._holes():
            self._hole_cost = 0.0

    def step(self) -> list[RowUpdate]:
        decoder = self._decoder
        holes = self._holes()
        if self._filled() >= decoder.cache_size:
            self._rearrange(self._engine.cache_size_for(self._filled() + 1))
        elif holes and self._hole_cost >= decoder.last_arrange_seconds:
            self._rearrange(self._engine.cache_size_for(self._filled() + 1))
        holes = self._holes()
        decoder.lengths[holes] = 0  # a hole's garbage stays in its first slot
        logits = decoder.step(self._next)
        eos = self._engine.eos_id
        updates = []
        for b, row in enumerate(self._rows):
            if row is None:
                continue
            history = self._history[b]
            token = next_token(logits[b], row, self._generated[b], history or ())
            logprobs = None if row.logprobs is None else [token_logprob(logits[b], token, row.logprobs)]
            self._next[b] = token
            if token == eos:
                updates.append(RowUpdate(self._keys[b], [], "eos_token", logprobs))
                continue
            if history is not None:
                history.append(token)
            self._generated[b] += 1
            finish = "length" if self._generated[b] >= row.max_tokens else None
            updates.append(RowUpdate(self._keys[b], [token], finish, logprobs))
        if holes:
            self._hole_cost += decoder.last_step_seconds * len(holes) / len(self._keys)
        else:
            self._hole_cost = 0.0
        return updates

    def filter(self, keys: Sequence[Hashable]) -> None:
        kept = set(keys)
        for b, key in enumerate(self._keys):
            if key is not None and key not in kept:
                self._keys[b] = self._rows[b] = None
        if not self.keys:  # empty: the decoder keeps its shape, for the next rows to reuse
            self._hole_cost = 0.0

    def _holes(self) -> list[int]:
        return [b for b, key in enumerate(self._keys) if key is None]

    def _rearrange(self, cache_size: int, extra: int = 0) -> None:
        """Move the rows to a new shape: the live rows in order, then `extra` empty positions
        (holes for joining rows). Counted in the engine's `compactions` when rows were dropped."""
        live = [b for b, key in enumerate(self._keys) if key is not None]
        if len(live) + extra == 0:
            return
        dropped = len(self._keys) - len(live)
        self._decoder.arrange(live + [None] * extra, cache_size)
        self._keys = [self._keys[b] for b in live] + [None] * extra
        self._rows = [self._rows[b] for b in live] + [None] * extra
        self._generated = [self._generated[b] for b in live] + [0] * extra
        self._history = [self._history[b] for b in live] + [None] * extra
        self._next = np.concatenate([self._next[live], np.zeros([extra], np.int64)]).astype(np.int64)
        if dropped and live:
            self._engine.compactions += 1
        self._hole_cost = 0.0

    def _filled(self) -> int:
        live = [b for b, key in enumerate(self._keys) if key is not None]
        return int(self._decoder.lengths[live].max()) if live else 0


def _drop_mapped_pages(path: Path) -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux: nothing to release
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
                released += end - start
    return released


def resolve_precision(precision: str, meta: dict) -> str:
    if precision == "auto":
        return "int8" if meta["quality"]["int8_enabled"] else "fp32"
    return precision


def cache_buckets(step: int, context_window: int) -> tuple[int, ...]:
    """Cache sizes in multiples of `step` up to the context window: attention costs what the
    allocated cache costs, so a batch takes the smallest that holds its longest row. Nothing is
    compiled per size, so the steps can be fine (a 528-slot batch gets 640 slots, not 1024)."""
    return (*range(step, context_window, step), context_window)


class Rows:
    """Rows of a 2-D .npy file, read on demand with pread(2).

    The token embeddings are GPT-2's LM head too (50257 x 768 floats, 150 MB): only the rows of
    the tokens met are read, and none stay resident (a memory map's read-ahead kept tens of MB
    of neighbouring rows resident after a few hundred random tokens)."""

    def __init__(self, path: Path):
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran_order, self.dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                                else np.lib.format.read_array_header_2_0(f))
            self._offset = f.tell()
        if len(shape) != 2 or fortran_order:
            raise ValueError(f"{path} does not hold a 2-D C-ordered array")
        self.shape = shape
        self._row_bytes = shape[1] * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, ids: Sequence[int]) -> np.ndarray:
        out = np.empty([len(ids), self.shape[1]], self.dtype)
        for k, i in enumerate(ids):
            out[k] = np.frombuffer(os.pread(self._fd, self._row_bytes, self._offset + int(i) * self._row_bytes),
                                   self.dtype)
        return out

    def __del__(self):
        os.close(self._fd)


def load_tokenizer(model_dir: Path):
    """GPT-2's byte-level BPE from tokenizer.json (the converter writes one where a model has only
    vocab.json + merges.txt)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))
