"""The LiteRT backend: GPT-2 on TensorFlow Lite's runtime, with no TensorFlow imported.

The model file (made by `scripts/convert_model.py`) has three signatures over one set of weights:
`decode` runs one token for each row of the batch over a key/value pool and returns that token's
keys, values and hidden state; `extend` runs a few new tokens over a pool given with the call
(a prompt's prefill, or the short lane's rows); `head` turns hidden states into logits. The
batch's pool is the decode signature's input arrays, which the host owns and the runtime reads
in place (`litert_runtime`: no copy per call; copying the cache in and out of each call costs
more than the step itself at batch 8). After each step the host writes the new slot and opens it
in the additive attention mask.

Every row keeps its own positions (no left padding): a row's prompt fills slots 0..n-1 and each
new token the next slot, so a prompt is prefilled at its own length and a row's numbers are the
same whatever shares its batch. Token and position embeddings are looked up on the host (GATHER
is not delegated to XNNPACK).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service import memory
from service.detokenize import byte_fallback_ids
from service.engine.base import DecodeBatch, Engine, GenerationRow, RowUpdate, TokenLogprob
from service.engine.kv_pool import PoolSizes, Slots, call_bytes, slots_wanted
from service.engine.litert_runtime import CustomOp, Program, Signature, drop_mapped_pages, release_pages
from service.engine.native import kvattn
from service.engine.sampling import next_token, token_logprob
from service.model_files import LITERT_META, end_of_sequence_ids, litert_model_file, resolve_precision

log = logging.getLogger(__name__)

MASKED = -1e4  # transformers' TF GPT-2 mask value
# The short lane (LiteRTBatch): a joining row also gets calls of its own when it asks for at most
# LANE_MAX_TOKENS new tokens, its prompt and answer fit LANE_MAX_SLOTS slots (its keys and values
# are copied into each of its calls), the running rows hold on average at least LANE_SHORTER
# times its slots (similar rows share calls: splitting them would only cost a call's fixed
# part), and the batch's last call took at least LANE_CHEAPER times a lane call.
LANE_MAX_ROWS = 4  # at most this many lane rows at once
LANE_MAX_TOKENS = 64
LANE_MAX_SLOTS = 256
LANE_SHORTER = 4
LANE_CHEAPER = 2.0
LANE_AVERAGING = 0.2  # weight of the newest lane call in the lane's running call time
# What an empty position costs a decode call, as a share of a row's part (call time / positions):
# at 256-2,048 pool slots, 8 positions cost 1.6-2.4x what 1 does, not 8x (the weights are read once).
HOLE_SHARE = 0.6
# A hole compacted away is a position added back when the next row joins (clients come back):
# dropping holes costs this many rearrangements.
HOLE_REFILLS = 2
# Prompt tokens an `extend` call prefills at most (Decoder.encode_prompt).
PREFILL_CHUNK = 128
ARRANGE_SAMPLE_SLOTS = 128  # an `arrange` that moved at least this many slots sets the cost a slot


class Decoder:
    """One LiteRT model file, and the key/value pool of the batch it decodes.

    Rows sit at batch positions; a position holds a row or is empty. Every layer's keys and
    values live in one pool of slots that all rows share: row b owns the slots in `slots[b]` (in
    the order of its positions), and the decode signature's mask shows each row its own slots
    only. A row's slots can be anywhere in the pool, so rows join and leave without moving the
    others, a finished row's slots go back to the free list, and a call reads the pool once
    however long or short its rows are.

    Contract: `arrange(sources, pool_size)` makes the batch's positions (kept rows and empty new
    ones) over a pool of `pool_size` slots; `open_row(b)` / `close_row(b)` start and end the row
    at empty position b; `prefill(b, ids)` puts ids into new slots of row b (no logits: a
    prompt's last token goes through `step`); `step(ids)` puts one token per row into a new slot
    of each and returns the logits after it. Both take free slots, which the caller makes sure
    exist (`free_slots`).
    """

    def __init__(self, model_path: Path, embeddings: Rows, positions: np.ndarray, num_threads: int,
                 capacity: int | None = None):
        self._model_path = model_path.resolve()
        # The decode signature's attention is the KVAttention custom op (litert_convert.kv_attention).
        self._kernel = kvattn.load(num_threads)
        self._program = Program(self._model_path, num_threads,
                                custom_ops=[CustomOp(self._kernel.name, self._kernel.kernel, self._kernel.user_data)])
        self._embeddings = embeddings
        self._positions = positions
        # Each signature keeps its arrays' memory for the next call (see `arrange` for the pool's).
        self._extend = self._program.signature("extend")
        self._decode = self._program.signature("decode")
        self._head = self._program.signature("head")
        # The logits come in slices of the vocabulary (litert_convert.HEAD_SLICE_WEIGHTS), in order.
        self._logits = sorted(self._head.output_names, key=lambda name: int(name.rsplit("_", 1)[1]))
        # Rotary models (the Llama family) take each token's cos and sin as the `rope` input;
        # GPT-2's learned position embeddings are added to the token's on the host instead.
        self.rotary = "rope" in self._decode.input_names
        key = self._decode.declared("key_0")
        self.n_head, self.head_dim = int(key[0]), int(key[2])
        self.kernel_threads = self._kernel.num_threads
        self.cache_dtype = self._decode.dtype("key_0")  # float16 in the int8 file (litert_convert.FILES)
        self.n_layer = sum(1 for name in self._decode.input_names if name.startswith("key_"))
        if capacity is not None:  # address space: a page takes memory when a pool first writes it
            self._decode.reserve({name: [self.n_head, capacity, self.head_dim] for name in self.cache_names()})
        self.batch_size = 0
        self.table = Slots()  # which slots each position's row owns (service/engine/kv_pool.py)
        self.last_arrange_seconds = 0.0  # what the last `arrange`, `step` and `step_apart` took
        # What an `arrange` costs per filled slot it moves (the copy out and back, and the
        # reallocation when the pool grows): measured by those that moved many, 25 us until then.
        self.arrange_seconds_per_slot = 25e-6
        self.last_step_seconds = 0.0
        self.last_apart_seconds = 0.0

    # --- the batch's pool -------------------------------------------------------------------

    @property
    def pool_size(self) -> int:
        return self.table.pool_size

    @property
    def live(self) -> list[bool]:
        return self.table.live

    @property
    def slots(self) -> list[list[int]]:
        return self.table.slots

    @property
    def lengths(self) -> np.ndarray:
        return self.table.lengths

    @property
    def free_slots(self) -> int:
        return self.table.free

    @property
    def used_slots(self) -> int:
        return self.table.used

    def arrange(self, sources: Sequence[int | None], pool_size: int) -> None:
        """Make the batch `sources` long over `pool_size` slots: position j takes the row at
        current position `sources[j]`, or is empty where it is None.

        The kept rows' slots move to the new shape: where they all fit the new pool they stay
        where they are (a growing pool's case), else they are packed at the pool's start. A pool
        tensor is [K, S, D], so a new S moves every head's slots: within the tensor's memory,
        reserved for the largest pool (`capacity`), heads last first when the pool grows and
        first first when it shrinks, and the memory past a smaller pool goes back to the
        kernel. The pool is never held twice (without a reservation large enough, a larger pool
        is new memory, and the old is copied across and let go). Where the kept slots moved, the
        pages past them go back to the kernel (they read as zeros): the attention kernel never
        reads a slot the mask leaves out."""
        started = time.perf_counter()
        plan = self.table.plan(sources, pool_size)
        top, order = plan.top, plan.order
        old = dict(self._decode.inputs) if top else {}  # nothing to copy, maybe no arrays yet
        self._resize_decode(len(sources), pool_size)
        for name in self.cache_names() if top else ():
            before = old[name]
            # A gathered copy (one tensor's kept slots), or the slots in place.
            _move_slots(self._decode.inputs[name], before[:, order] if order is not None else before[:, :top])
        del old
        self._decode.trim()
        # The free slots past the kept ones, where kept slots moved (a new pool size): the heads
        # moved away from pages they had written, which would stay resident as unused slots of
        # the new layout. The kernel never reads a free slot, so they may read as zeros. (Not
        # for an empty batch: 144 madvise calls took 1.7 ms, a new request's first token's time.)
        moved = top and pool_size != self.table.pool_size
        for name in self.cache_names() if moved and pool_size > top else ():
            pool = self._decode.inputs[name]
            for head in range(self.n_head):
                release_pages(pool[head, top:])
        mask = self._decode.inputs["mask"]
        mask[...] = MASKED
        mask[..., pool_size] = 0  # the new token always sees itself
        for j, own in enumerate(plan.slots):
            mask[0, j, own] = 0
        self.table.take_shape(sources, plan, pool_size)
        self.last_arrange_seconds = time.perf_counter() - started
        if plan.used >= ARRANGE_SAMPLE_SLOTS:
            self.arrange_seconds_per_slot = self.last_arrange_seconds / plan.used

    def open_row(self, b: int) -> None:
        """Start a row at empty position b."""
        self.table.open(b)

    def close_row(self, b: int) -> None:
        """End the row at position b: its slots go back to the free list (they keep finite
        values, and no row's mask shows them)."""
        self._decode.inputs["mask"][0, b, self.table.close(b)] = MASKED

    def _resize_decode(self, batch_size: int, pool_size: int) -> None:
        heads, head_dim = self.n_head, self.head_dim
        shapes = {name: [heads, pool_size, head_dim] for name in self.cache_names()}
        shapes["mask"] = [1, batch_size, pool_size + 1]
        shapes["embeds"] = [batch_size, 1, self._embeddings.shape[1]]
        if self.rotary:
            shapes["rope"] = [batch_size, self._positions.shape[1]]
        self._decode.resize(shapes)
        self.batch_size = batch_size

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one slot in one of the pool's tensors (a layer's keys or values), at the cache
        precision."""
        return self.n_head * self.head_dim * self.cache_dtype.itemsize

    @property
    def slot_bytes(self) -> int:
        """Bytes of one pool slot: a key and a value per layer."""
        return self.n_layer * 2 * self.tensor_bytes

    def cache_names(self) -> list[str]:
        """The pool's tensors: key_0, value_0, key_1, ..."""
        return [f"{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")]

    # --- the two calls -------------------------------------------------------------------------

    def prefill(self, row: int, ids: Sequence[int]) -> None:
        """Put a prompt's ids into new slots of the row at empty position `row`."""
        if self.slots[row]:
            raise ValueError(f"position {row} already holds slots: a prompt is prefilled into a new row")
        if not len(ids):
            return
        parts, _ = self.encode_prompt(ids)
        slots = self.table.take(len(ids))
        for name, (pool, last) in zip(self.cache_names(), parts):
            self._write_slots(name, slots[:pool.shape[1]], pool)
            self._write_slots(name, slots[pool.shape[1]:], last)
        self._decode.inputs["mask"][0, row, slots] = 0
        self.table.give(row, slots)
        self.release_prompt_pool()

    def _write_slots(self, name: str, slots: Sequence[int], values: np.ndarray) -> None:
        """pool[:, slots] = values ([K, len(slots), D] float32) for one of the pool's tensors,
        converted to float16 by the kernel's library in a float16 pool (numpy's conversion took
        10 ms of a 400-token prompt's prefill), straight into the pool where the slots are one run."""
        pool = self._decode.inputs[name]
        if pool.dtype != np.float16 or not len(slots):
            pool[:, slots] = values
        elif slots[-1] - slots[0] == len(slots) - 1 and np.all(np.diff(slots) == 1):
            self._kernel.to_half(values, pool[:, slots[0]:slots[-1] + 1])
        else:
            half = np.empty(values.shape, np.float16)
            self._kernel.to_half(values, half)
            pool[:, slots] = half

    def release_prompt_pool(self) -> int:
        """Give the kernel back the extend signature's pool memory, which a prompt's keys and
        values fill as it is prefilled (up to a full window's, `reserve_prompt`) and nothing needs
        between prompts; returns the bytes a prompt can take again (`encode_prompt` faults in
        what it needs at once)."""
        return self._extend.drop(self.cache_names())

    def encode_prompt(self, ids: Sequence[int], rows: Sequence[int] | None = None
                      ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """A prompt's keys and values, and the hidden states [len(rows), E] of its tokens at
        `rows` (ascending; default: the last), its tokens seeing only each other. The keys and
        values come per cache name as two parts, [K, p, D] then [K, n - p, D] (views, valid
        until the extend signature's next call). It uses the extend signature only: the decode
        signature's pool is left as it is.

        The prompt goes in `PREFILL_CHUNK` tokens a call, each chunk over the keys and values of
        the chunks before it: the extend signature's pool input, which holds them. Each call's new
        keys and values are appended to it for the next (the slots so far are moved apart,
        heads last first, to the next pool's layout), so the prompt's keys and values are held
        once. The first chunk's pool is a dummy slot none sees. One call over the whole prompt
        would hold scores of [heads, n, n] floats a layer (a 2,048-token SmolLM2 prompt: 151 MB
        each), and the runtime's arena keeps its largest size; a chunk's are [heads, chunk, n].
        The arithmetic is the same: each token attends over the same keys, and masked slots
        weigh exactly zero."""
        n = len(ids)
        if n > len(self._positions):
            raise ValueError(f"a prompt of {n} tokens does not fit the context window")
        ids, wanted = np.asarray(ids), [n - 1] if rows is None else list(rows)
        names, signature = self.cache_names(), self._extend
        # Its pages went back after the last prompt (`release_prompt_pool`): one call brings
        # them in again, where a fault per page added 8 ms to a 400-token prompt's 70 ms.
        signature.populate(names, self.n_head * self._reserve_prompt_pool(n) * self.head_dim)
        hidden, held = [], 0  # held: the pool input's slots of the prompt (0: the dummy slot)
        for start in range(0, n, PREFILL_CHUNK):
            end = min(n, start + PREFILL_CHUNK)
            m = end - start
            if start:
                mask = np.zeros([m, start + m], np.float32)
            else:
                mask = np.full([m, 1 + m], MASKED, np.float32)
                mask[:, 1:] = 0
            mask[:, -m:] = np.triu(np.full([m, m], MASKED, np.float32), k=1)
            # The chunk's wanted rows; at least one (its last) so the call's output is never empty.
            own = [r - start for r in wanted if start <= r < end]
            tokens = self.embed(ids[start:end], np.arange(start, end))
            before = {name: (signature.inputs[name], signature.outputs[name]) for name in names} if start else {}
            self._resize_extend(tokens, max(start, 1), len(own or [m - 1]))
            for name in names:
                pool = signature.inputs[name]
                if not start:
                    pool[...] = 0
                    continue
                old, new = before[name]
                for head in reversed(range(self.n_head)):  # to higher addresses: the last head first
                    pool[head, :held] = old[head, :held]
                pool[:, held:start] = new
            held = start
            self._call_extend(tokens, mask, own or [m - 1])
            if own:
                hidden.append(signature.outputs["hidden"].copy())
        parts = [(signature.inputs[name][:, :held], signature.outputs[name]) for name in names]
        return parts, np.concatenate(hidden) if hidden else np.zeros([0, self._embeddings.shape[1]], np.float32)

    def reserve_prompt(self, n: int) -> None:
        """Give the extend signature's arrays and the runtime's arena the size the calls of an
        n-token prompt take in `encode_prompt` with every position wanted, by one call over zeros
        at a shape no such call exceeds: a whole chunk, all of its rows wanted, over the pool of
        the last chunk's start. A prompt of at most n tokens then touches no new memory."""
        names, signature = self.cache_names(), self._extend
        size, m = max(self._reserve_prompt_pool(n), 1), min(n, PREFILL_CHUNK)
        tokens = self.embed(np.zeros(m, np.int64), np.zeros(m, np.int64))  # what they hold is not read
        self._resize_extend(tokens, size, m)
        for name in names:
            signature.inputs[name][...] = 0
        self._call_extend(tokens, np.zeros([m, size + m], np.float32), range(m))

    def _reserve_prompt_pool(self, n: int) -> int:
        """Reserve the extend signature's pool inputs for an n-token prompt's chunks: the slots
        before its last chunk (at least the first chunk's dummy one). Returns the last chunk's start."""
        last = (n - 1) // PREFILL_CHUNK * PREFILL_CHUNK
        self._extend.reserve({name: [self.n_head, max(last, 1), self.head_dim] for name in self.cache_names()})
        return last

    def extend(self, tokens: dict[str, np.ndarray], mask: np.ndarray, pools: Sequence[np.ndarray],
               rows: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
        """The `extend` call: N new tokens' inputs (`embed`'s: embeddings [N, E], and [N, 2D]
        rotary tables for a rotary model) over `pools` (one [K, S, D] per cache name, in
        `cache_names` order) as `mask` [N, S + N] allows -> (each cache name's new keys or
        values [K, N, D], the hidden states [len(rows), E] of the new tokens at `rows`); copies."""
        self._resize_extend(tokens, pools[0].shape[1], len(rows))
        for name, pool in zip(self.cache_names(), pools):
            self._extend.inputs[name][...] = pool
        self._call_extend(tokens, mask, rows)
        new = [self._extend.outputs[name].copy() for name in self.cache_names()]
        return new, self._extend.outputs["hidden"].copy()

    def _resize_extend(self, tokens: dict[str, np.ndarray], size: int, rows: int) -> None:
        """Shape the extend signature for `tokens` over a pool of `size` slots, `rows` rows wanted."""
        n = tokens["embeds"].shape[0]
        shapes = {name: [self.n_head, size, self.head_dim] for name in self.cache_names()}
        shapes.update(mask=[1, n, size + n], rows=[rows])
        shapes.update({name: [1, *value.shape] if name == "embeds" else list(value.shape)
                       for name, value in tokens.items()})
        self._extend.resize(shapes)

    def _call_extend(self, tokens: dict[str, np.ndarray], mask: np.ndarray, rows: Sequence[int]) -> None:
        """Write the call's own inputs (the pool's are written) and run it."""
        self._put(self._extend, tokens)
        self._extend.inputs["mask"][0] = mask
        self._extend.inputs["rows"][...] = rows
        self._extend.run()

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """Hidden states [M, E] -> logits [M, V] (a copy: the slices joined)."""
        self._head.resize({"hidden": list(hidden.shape)})
        self._head.inputs["hidden"][...] = hidden
        self._head.run()
        return np.concatenate([self._head.outputs[name] for name in self._logits], axis=1)

    def step(self, ids: np.ndarray) -> np.ndarray:
        """One token per position (in batch order; an empty position's is ignored) -> logits
        [batch, vocab] (a copy; an empty position's are meaningless)."""
        started = time.perf_counter()
        rows = np.flatnonzero(self.live)
        at = self.lengths
        slots = np.array(self.table.take(len(rows)), np.int64)
        self._put(self._decode, self.embed(ids, at))
        errors = self._kernel.errors()
        self._decode.run()
        if self._kernel.errors() != errors:  # LiteRT does not pass on a custom op's failure
            raise RuntimeError("the KVAttention kernel refused the decode call's tensors")
        for name in self.cache_names():
            self._write_slots(name, slots, self._decode.outputs[name][:, rows])
        self._decode.inputs["mask"][0, rows, slots] = 0
        for b, slot in zip(rows, slots):
            self.table.give(b, [slot])
        logits = self.head(self._decode.outputs["hidden"])
        self.last_step_seconds = time.perf_counter() - started
        return logits

    def step_apart(self, rows: Sequence[int], ids: np.ndarray) -> np.ndarray:
        """One token for each row at positions `rows` (ids in that order), apart from the rest
        of the batch: an `extend` call over these rows' own slots only, copied out of the pool,
        and their new slots written back -> logits [len(rows), vocab]."""
        started = time.perf_counter()
        lengths = [len(self.slots[b]) for b in rows]
        own = np.array([slot for b in rows for slot in self.slots[b]], np.int64)
        size, n = len(own), len(rows)
        if size:
            pools = [self._decode.inputs[name][:, own] for name in self.cache_names()]
        else:  # rows with no slots yet (one-token prompts): a dummy slot none sees
            pools = [np.zeros([self.n_head, 1, self.head_dim], np.float32)] * len(self.cache_names())
        width = pools[0].shape[1]
        mask = np.full([n, width + n], MASKED, np.float32)
        at = 0
        for i, length in enumerate(lengths):  # each row sees its own slots, and itself
            mask[i, at:at + length] = 0
            mask[i, width + i] = 0
            at += length
        new, hidden = self.extend(self.embed(ids, np.array(lengths, np.int64)), mask, pools, range(n))
        slots = self.table.take(n)
        for name, values in zip(self.cache_names(), new):
            self._write_slots(name, slots, values)
        decode_mask = self._decode.inputs["mask"]
        for b, slot in zip(rows, slots):
            decode_mask[0, b, slot] = 0
            self.table.give(b, [slot])
        logits = self.head(hidden)
        self.last_apart_seconds = time.perf_counter() - started
        return logits

    def embed(self, ids: Sequence[int], positions: np.ndarray) -> dict[str, np.ndarray]:
        """The inputs of tokens `ids` at `positions`, looked up on the host: "embeds" [N, E]
        (GPT-2: token + position embeddings), and for a rotary model "rope" [N, 2D] (the
        positions' cos and sin)."""
        if self.rotary:
            return {"embeds": self._embeddings[ids], "rope": np.asarray(self._positions[positions], np.float32)}
        return {"embeds": self._embeddings[ids] + self._positions[positions]}

    def _put(self, signature: Signature, tokens: dict[str, np.ndarray]) -> None:
        """Write `embed`'s arrays into a signature's inputs (the embeddings' has a batch axis)."""
        for name, value in tokens.items():
            view = signature.inputs[name]
            view[...] = value.reshape(view.shape)

    # --- the runtime ---------------------------------------------------------------------------

    def release_file_pages(self) -> int:
        """Drop this process's resident pages of the mapped model file; returns bytes released.

        The runtime maps the .tflite file and XNNPACK packs its weights into its cache file when
        the model is compiled, after which the mapped pages are read only if a call needs them
        again (they then fault back in from the file) (madvise(2), MADV_DONTNEED on a read-only
        file mapping)."""
        return drop_mapped_pages(self._model_path)


class LiteRTGPT2Engine(Engine):
    """A GPT-2-family model served from the LiteRT files in a model directory."""

    backend = "litert"

    def __init__(self, model_dir: Path, *, precision: str = "auto", max_batch_size: int = 8,
                 num_threads: int = 0, smallest_cache: int = 128, short_lane: bool = True,
                 max_context: int | None = None):
        meta = json.loads((model_dir / LITERT_META).read_text())
        gate = meta["quality"]
        self.precision = resolve_precision(precision, meta)
        log.info("int8 quality gate at conversion: %s", gate["reason"])
        if precision == "int8" and not gate["int8_enabled"]:
            log.warning("serving int8 although the quality gate rejected it (%s)", gate["reason"])
        self.eos_id, self.eos_ids = end_of_sequence_ids(model_dir, primary=int(meta["eos_token_id"]))
        self.query_heads = int(meta["n_head"])  # the pool holds key/value heads (fewer, with GQA)
        # The window a row's prompt and answer span: the model's, or less (`max_context`).
        self.context_window = min(int(meta["n_positions"]), max_context or int(meta["n_positions"]))
        self.max_batch_size = max_batch_size
        self._tokenizer = load_tokenizer(model_dir)
        self.byte_fallback_ids = byte_fallback_ids(self._tokenizer)
        embeddings = Rows(model_dir / meta["embeddings"])
        self.vocab_size = int(embeddings.shape[0])
        positions = np.load(model_dir / meta["positions"], mmap_mode="r")  # rows read as positions are met
        self._threads = num_threads or len(os.sched_getaffinity(0))
        self._model_path = model_dir / litert_model_file(self.precision)
        self._embeddings, self._positions = embeddings, positions
        # The pool holds every row's slots: at most a full window a row, and a slot per row for
        # the call that fills the last.
        largest = max_batch_size * (self.context_window + 1)
        self.decoder = Decoder(self._model_path, embeddings, positions, self._threads, capacity=largest)
        d = self.decoder
        self.pool = PoolSizes(smallest_cache, largest, d.slot_bytes, d.tensor_bytes,
                              call_bytes(max_batch_size, self.query_heads // d.n_head, d.kernel_threads))
        self.compactions = 0
        self.short_lane = short_lane
        self.lane_call_seconds = math.inf  # what a lane call takes: measured by warm-up, then kept up to date

    # --- Engine interface -------------------------------------------------------------------

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=special_tokens).ids or [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def warmup(self) -> None:
        """Run a short batch through every signature (the runtime sets up each on first use),
        let go of the model file's pages, which the packed copy has replaced, then size the
        extend signature for a full-window prompt scored at every position.

        The extend signature's arrays and the runtime's arena grow with the prompt's length and
        never shrink (a chunk's pool is the prompt's keys and values so far), and
        `prompt_logprobs` wants every position's hidden state: sizing them for a full window
        here (`Decoder.reserve_prompt`) puts the most either can take into the resident memory
        the runtime measures as its baseline (its pool is then given back: `prompt_reserve_bytes`
        counts it), so the memory budget need not hold it. One call
        does it: scoring a whole window took 0.65 s of a 0.8 s warm-up, and encoding one 0.3 s
        (DistilGPT2 int8), for the same memory. Sized after the release: the file's pages and
        the arena together took the warm-up's peak from 860 to 1,021 MiB (fp32 DistilGPT2)."""
        started = time.monotonic()
        rows = [GenerationRow((self.eos_id, self.eos_id), 2)] * self.max_batch_size
        self.generate(rows)
        released = self.decoder.release_file_pages()
        self.decoder.reserve_prompt(self.context_window)
        self.lane_call_seconds = self._time_lane_call()
        released += self.decoder.release_file_pages()  # any page the new shapes read again
        # A prompt's keys and values take the extend pool's memory only while it is prefilled;
        # the budget counts them as resident all the same.
        self.prompt_reserve_bytes = self.decoder.release_prompt_pool()
        # The prompt's keys, a layer at a time, were heap blocks: without this, 47 MiB of the
        # baseline (SmolLM2 shape, a 1,024-token window).
        memory.release_free_heap()
        log.info("warm-up ran %s (%s) in %.1f s; %.0f MiB of mapped model file released", self.backend,
                 self.precision, time.monotonic() - started, released / 2**20)

    def _time_lane_call(self) -> float:
        """What a lane call of one short row takes (the best of three), against which the
        batch's calls are weighed."""
        decoder, ids = self.decoder, np.array([self.eos_id], np.int64)
        decoder.arrange([None], self.cache_sizes[0])
        decoder.open_row(0)
        decoder.prefill(0, [self.eos_id] * 16)
        seconds = []
        for _ in range(3):
            decoder.step_apart([0], ids)
            seconds.append(decoder.last_apart_seconds)
        decoder.close_row(0)
        return min(seconds)

    def new_batch(self) -> LiteRTBatch:
        return LiteRTBatch(self)

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
        """One `extend` call over the whole prompt (causal, as a prefill) for every position's
        hidden state, then `head` over at most `max_batch_size` positions at a time, so the
        logits held at once are a batch's, not the prompt's (1,024 x 50,257 floats: 200 MB).

        It uses the decoder's extend and head signatures, which the batch's prefills and lane
        calls use too, and leaves the decode signature's pool as it is: call it on the thread
        that owns the batch (the scheduler's worker, between decode calls), never beside it."""
        n = len(prompt_ids)
        out: list[TokenLogprob | None] = [None]
        if n < 2:
            return out
        _, hidden = self.decoder.encode_prompt(prompt_ids, range(n - 1))  # position n-1 predicts nothing
        self.decoder.release_prompt_pool()
        for start in range(0, n - 1, self.max_batch_size):
            logits = self.decoder.head(hidden[start:start + self.max_batch_size])
            out += [token_logprob(row, prompt_ids[start + i + 1], top) for i, row in enumerate(logits)]
        return out

    # --- memory (service/memory.py measures the budget; the scheduler admits by it) ----------

    @property
    def cache_sizes(self) -> tuple[int, ...]:
        """The pool sizes a batch takes (service/engine/kv_pool.py), capped by the budget."""
        return self.pool.current

    def batch_bytes(self, rows: Sequence[GenerationRow]) -> int:
        return self.pool.batch_bytes(rows)

    def pool_bytes(self, pool: int) -> int:
        return self.pool.pool_bytes(pool)

    def set_memory_budget(self, budget: int | None) -> None:
        """Cap the largest pool at the largest size whose `pool_bytes` fit `budget`."""
        super().set_memory_budget(budget)
        self.pool.cap(budget)

    def kv_slots_used(self) -> int:
        return self.decoder.used_slots

    def kv_bytes_reserved(self) -> int:
        """The pool's bytes while it holds a row; 0 when idle. An idle decoder keeps its last
        shape for the next rows (and its arrays keep their pages), but what an operator
        watches is what the running rows hold, returning to zero when they are done."""
        if not any(self.decoder.live):
            return 0
        return self.decoder.pool_size * self.decoder.slot_bytes

    def cache_size_for(self, slots: int) -> int:
        """The smallest pool size holding `slots` (the largest, if none does)."""
        return self.pool.size_for(slots)


@dataclass
class _RowState:
    """A row being decoded: its request, the token it feeds to its next call, and what it made."""

    key: Hashable
    row: GenerationRow
    next: int  # the token its next call takes in
    generated: int = 0  # new tokens so far
    history: list[int] | None = None  # prompt + new tokens, for rows with a repetition penalty
    short: bool = False  # in the short lane: it also gets calls of its own

    @classmethod
    def joining(cls, key: Hashable, row: GenerationRow, short: bool = False) -> _RowState:
        history = list(row.prompt_ids) if row.repetition_penalty != 1.0 else None
        return cls(key, row, row.prompt_ids[-1], history=history, short=short)

    def advance(self, logits: np.ndarray, eos: frozenset[int]) -> RowUpdate:
        """Take the next token from this row's logits; the row ends on any token of `eos` (a
        failure is this row's alone: its update carries the error)."""
        row = self.row
        try:
            token = next_token(logits, row, self.generated, self.history or ())
            logprobs = None if row.logprobs is None else [token_logprob(logits, token, row.logprobs)]
        except Exception as exc:
            return RowUpdate(self.key, [], error=exc)
        self.next = token
        if token in eos:
            return RowUpdate(self.key, [], "eos_token", logprobs)
        if self.history is not None:
            self.history.append(token)
        self.generated += 1
        return RowUpdate(self.key, [token], "length" if self.generated >= row.max_tokens else None, logprobs)


class LiteRTBatch(DecodeBatch):
    """Rows decoding together in the engine's one decoder (one batch at a time per engine), and
    a short lane beside them.

    Each `step` is one call: a decode call of the batch (one token a row), or an `extend` call of
    the short lane (one token a lane row). The pool is the smallest bucket that holds
    the rows' filled slots and some headroom (`_slots_wanted`), and grows when it runs out: a
    call reads every slot of the pool, so a pool sized for the rows' final lengths would make
    each call pay for slots nothing has filled yet. A row that leaves gives its slots back to the
    free list, where the next tokens take them, and leaves a hole in the batch that the next
    joining row takes in place (a client answered tends to come back). Holes and a pool more
    than a bucket too large cost a share of every call; they are compacted away once they have
    cost, in measured call time, what compacting would cost now (the ski-rental rule: never
    pay more than twice the better choice in hindsight): a rearrangement, or two when holes go
    (the next joining row adds its position back). Changing the shape (more positions,
    fewer, another pool size) rearranges: a copy of the filled slots. An empty batch takes the
    shape its joining rows need at once (nothing to copy).

    The short lane: a call reads the whole pool, so with long rows running a short request's
    every token would cost what their calls cost (several times a call of its own at a few
    thousand slots). A joining row that is short (at most `LANE_MAX_TOKENS` new tokens, prompt
    and answer within `LANE_MAX_SLOTS`), much shorter than the running rows, and whose own calls
    would cost at most half of theirs, is a lane row: it takes part in the batch's calls like
    any row, and between them gets `extend` calls of its own, over its own slots only (copied
    out of the pool; they are few). Lane calls take at most as much time as the batch's last
    call between two batch calls, so running rows keep at least half their speed while short
    requests pass.
    """

    def __init__(self, engine: LiteRTGPT2Engine):
        self._engine = engine
        self._decoder = engine.decoder
        self._rows: list[_RowState | None] = []  # per batch position; None is a hole
        self._lane_seconds = 0.0  # time of lane calls since the batch's last call
        self._waste = 0.0  # seconds of calls spent on holes and spare slots since the last rearrangement

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self._rows if r is not None]

    @property
    def lane_keys(self) -> list[Hashable]:
        """The rows that also get calls of their own (the short lane)."""
        return [r.key for r in self._rows if r is not None and r.short]

    def extend(self, entries: Sequence[tuple[Hashable, GenerationRow]]) -> None:
        if not entries:
            return
        if len(self.keys) + len(entries) > self._engine.max_batch_size:
            raise ValueError(f"a batch holds at most {self._engine.max_batch_size} rows")
        decoder = self._decoder
        shorts, lane = [], len(self.lane_keys)
        for _, row in entries:  # judged against the rows already running
            shorts.append(lane < LANE_MAX_ROWS and self._is_short(row))
            lane += shorts[-1]
        self._engine.lane_rows += sum(shorts)
        # Room for every prompt, and for the next calls' slots of every row.
        prompts = sum(len(row.prompt_ids) for _, row in entries)
        holes = self._holes()
        # An empty batch is rearranged to fit its new rows at once: there is nothing to copy.
        if (not self.keys or len(holes) < len(entries)
                or decoder.free_slots < prompts + len(self.keys) + len(entries)):
            self._rearrange(extra=len(entries), slots=self._slots_wanted([row for _, row in entries]))
            holes = self._holes()
        for b, (key, row), short in zip(holes, entries, shorts):
            decoder.open_row(b)
            decoder.prefill(b, row.prompt_ids[:-1])
            self._rows[b] = _RowState.joining(key, row, short)

    def _is_short(self, row: GenerationRow) -> bool:
        """Whether a joining row gets calls of its own (see the class doc)."""
        running = [len(self._decoder.slots[b]) for b, r in enumerate(self._rows) if r is not None]
        needs = len(row.prompt_ids) + row.max_tokens
        return (self._engine.short_lane and bool(running) and row.max_tokens <= LANE_MAX_TOKENS
                and needs <= LANE_MAX_SLOTS and sum(running) / len(running) >= LANE_SHORTER * needs
                and self._decoder.last_step_seconds >= LANE_CHEAPER * self._engine.lane_call_seconds)

    def step(self) -> list[RowUpdate]:
        shorts = [b for b, r in enumerate(self._rows) if r is not None and r.short]
        decoder = self._decoder
        if decoder.free_slots < len(self.keys):
            self._rearrange(slots=self._slots_wanted())
        elif self._waste >= self._compaction_cost():
            self._rearrange(slots=self._slots_wanted())
        elif shorts and self._lane_seconds < decoder.last_step_seconds:
            return self._lane_step(shorts)
        self._lane_seconds = 0.0
        holes, spare, positions = len(self._holes()), self._spare_slots(), len(self._rows)
        logits = decoder.step(np.array([r.next if r is not None else 0 for r in self._rows], np.int64))
        eos = self._engine.eos_ids
        updates = [r.advance(logits[b], eos) for b, r in enumerate(self._rows) if r is not None]
        # A hole costs `HOLE_SHARE` of a row's share of the call, spare slots their share of the pool.
        self._waste += decoder.last_step_seconds * (HOLE_SHARE * holes / positions + spare / decoder.pool_size)
        return updates

    def _lane_step(self, shorts: list[int]) -> list[RowUpdate]:
        rows = [self._rows[b] for b in shorts]
        logits = self._decoder.step_apart(shorts, np.array([r.next for r in rows], np.int64))
        eos = self._engine.eos_ids
        updates = [r.advance(logits[i], eos) for i, r in enumerate(rows)]
        seconds = self._decoder.last_apart_seconds  # the call alone, as the batch's `last_step_seconds`
        self._lane_seconds += seconds
        self._engine.lane_calls += 1
        self._engine.lane_call_seconds += LANE_AVERAGING * (seconds - self._engine.lane_call_seconds)
        return updates

    def filter(self, keys: Sequence[Hashable]) -> None:
        kept = set(keys)
        for b, r in enumerate(self._rows):
            if r is not None and r.key not in kept:
                self._decoder.close_row(b)
                self._rows[b] = None
        if not self.keys:  # empty: the decoder keeps its shape, for the next rows to reuse
            self._waste = 0.0

    def _arrange_cost(self) -> float:
        """What rearranging now would cost: the filled slots to move, at the measured cost a slot."""
        return self._decoder.arrange_seconds_per_slot * self._decoder.used_slots

    def _compaction_cost(self) -> float:
        """What compacting now would cost (inf: nothing to compact): a rearrangement, or
        `HOLE_REFILLS` of them when it drops holes."""
        if self._holes():
            return HOLE_REFILLS * self._arrange_cost()
        return self._arrange_cost() if self._spare_slots() else math.inf

    def _holes(self) -> list[int]:
        return [b for b, r in enumerate(self._rows) if r is None]

    def _slots_wanted(self, joining: Sequence[GenerationRow] = ()) -> int:
        """The slots a pool is sized for (`kv_pool.slots_wanted`), with the `joining` rows'
        prompts counted as filled: 8 prompts of 900 tokens get a pool that holds their 124 new
        tokens each at once, so it never grows for them."""
        used = self._decoder.used_slots + sum(len(row.prompt_ids) - 1 for row in joining)
        return slots_wanted(used, len(self.keys) + len(joining))

    def _spare_slots(self) -> int:
        """Slots a rearrangement now would drop: the pool less the bucket it would be."""
        return max(0, self._decoder.pool_size - self._engine.cache_size_for(self._slots_wanted()))

    def _rearrange(self, slots: int, extra: int = 0) -> None:
        """Move the rows to a new shape: the live rows in order, then `extra` empty positions
        (holes for joining rows), over the smallest pool that holds `slots`. Counted in the
        engine's `compactions` when rows were dropped."""
        live = [b for b, r in enumerate(self._rows) if r is not None]
        if len(live) + extra == 0:
            return
        dropped = len(self._rows) - len(live)
        self._decoder.arrange(live + [None] * extra, self._engine.cache_size_for(slots))
        self._rows = [self._rows[b] for b in live] + [None] * extra
        if dropped and live:
            self._engine.compactions += 1
        self._waste = 0.0


def _move_slots(pool: np.ndarray, kept: np.ndarray) -> None:
    """Write `kept` [K, n, D] into `pool[:, :n]` ([K, S, D]), which may share its memory with
    a pool of another S: each head's block moves to its place in the new layout, in the order
    that never overwrites a block not yet moved (numpy buffers a block that overlaps itself)."""
    heads = range(pool.shape[0])
    growing = pool.strides[0] > kept.strides[0]  # moving to higher addresses: the last head first
    for head in reversed(heads) if growing else heads:
        pool[head, :kept.shape[1]] = kept[head]


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
