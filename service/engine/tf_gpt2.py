"""The TensorFlow backend: GPT-2 over fixed-shape key/value caches, XLA-compiled, batched continuously.

transformers supplies the model (TFGPT2LMHeadModel: its layers and weights). This module owns
the loop around it: the cache, attention over the cache, sampling and stopping. transformers'
own `generate` can't give per-row sampling parameters, streaming or a second backend under XLA.

A batch is extended and filtered between decode calls (continuous batching, as in TGI and vLLM).
Rows are not padded to a common length: a row's prompt fills cache slots 0..n-1 at positions
0..n-1 and each new token the row's next slot, and a row attends to its own filled slots only.
So a row can join a running batch without moving the others, and its numbers are the same
whatever shares the batch.

Two programs are compiled, each once per shape:
- prefill, at batch 1 for each cache size: one chunk of `prefill_chunk` tokens of one joining
  row's prompt. The last chunk is right-padded: under the causal mask padding never reaches a
  real token, and the slots it fills stay masked until decode overwrites them. The row's cache
  and the hidden state of its last real token then enter the batch through eager ops (pad,
  gather, concat, scatter), which compile nothing.
- decode, at each (batch size, cache size): up to `decode_chunk` steps of sample-then-forward in
  one call, so Python's per-call cost is paid once per chunk. Inside a call the cache is a loop
  variable, each row's new key and value scattered in place into its own next slot; it is
  copied once per call, not once per step.
and, for batches holding a row beyond plain temperature sampling (top_k, top_p, a repetition
penalty or log-probabilities), a third:
- logits, at each batch size: the logits of the batch's hidden states, for the host to choose
  those rows' tokens with `sampling.next_token` (the LiteRT backend's sampler) and report their
  log-probabilities. Decode then runs one step with those tokens forced in, and samples the
  batch's plain rows itself as it always does. So a plain row's tokens come from the same
  program and numbers whichever rows share its batch, and a row beyond plain sampling always
  takes this path: neither depends on its neighbours. It costs one call a token and a second
  pass over the output embedding: on DistilGPT2 at batch 4 (2 cores), 38 ms a step against 21
  for the plain loop, plus the host's filters (top_p about 1 ms a row).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.compiler.tf2xla.python import xla  # noqa: E402
from transformers import GPT2TokenizerFast, TFGPT2LMHeadModel  # noqa: E402
from transformers.tf_utils import stable_softmax  # noqa: E402

from service import memory  # noqa: E402
from service.detokenize import byte_fallback_ids  # noqa: E402
from service.engine import sampling  # noqa: E402
from service.engine.base import (  # noqa: E402
    DecodeBatch, Engine, FinishReason, GenerationRow, RowUpdate, TokenLogprob)
from service.engine.layout import Buckets  # noqa: E402
from service.model_files import describe_model, end_of_sequence_ids, model_type  # noqa: E402

log = logging.getLogger(__name__)

# transformers' TF GPT-2 masks with -1e4 (modeling_tf_gpt2.py); the same value keeps results equal.
MASKED = -1e4
PHILOX = 1  # tf.random.Algorithm.PHILOX
SAMPLE_BLOCK = 256  # vocabulary entries per block in the two-level sampling search
CACHE_COPIES = 3  # a batch's caches held at once at most (TFGPT2Engine.batch_bytes)


@dataclasses.dataclass
class _Row:
    """A row in a batch: the caller's key, its work, and how far it has got."""

    key: Hashable
    work: GenerationRow
    produced: int = 0  # new tokens so far; the row's filled slots are its prompt's plus these
    finish: FinishReason | None = None
    generated: list[int] = dataclasses.field(default_factory=list)  # for a repetition penalty

    @property
    def length(self) -> int:
        return len(self.work.prompt_ids) + self.produced


class TFDecodeBatch(DecodeBatch):
    """Rows decoded together by a `TFGPT2Engine`; `DecodeBatch` states the contract.

    Position b of the compiled shapes holds `_rows[b]`, or None: a filler, or a row that left
    while the rest still needed this shape. Those positions run marked done, and a joining row
    takes one. The shapes are the smallest buckets holding the rows, so a leaving row moves the
    rest to smaller ones when they fit (counted in the engine's `compactions`), and a joining
    row may move them to larger ones.
    """

    def __init__(self, engine: TFGPT2Engine):
        self._engine = engine
        self._rows: list[_Row | None] = []
        self._h = None  # [batch, 1, embd]: the hidden state each row's next token is sampled from
        self._caches: tuple = ()  # per layer (keys, values), each [batch, heads, cache, head_dim]

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self._rows if r is not None]

    @property
    def shape(self) -> tuple[int, int]:
        """(batch size, cache size) of the compiled programs this batch runs; (0, 0) when empty."""
        if not self._caches:
            return 0, 0
        batch, _, cache, _ = self._caches[0][0].shape
        return int(batch), int(cache)

    def extend(self, entries: Sequence[tuple[Hashable, GenerationRow]]) -> None:
        if not entries:
            return
        engine = self._engine
        joining = [_Row(key, work) for key, work in entries]
        live = [r for r in self._rows if r is not None]
        keys = [r.key for r in live + joining]
        if len(set(keys)) != len(keys):
            raise ValueError("a key joining the batch is already in it")
        if len(keys) > engine.max_batch_size:
            raise ValueError(f"{len(keys)} rows exceed max_batch_size={engine.max_batch_size}")
        for i, r in enumerate(joining):
            if not r.work.prompt_ids:
                raise ValueError(f"row {r.key!r} has no prompt tokens")
            engine.check_fits(i, r.work.prompt_ids, r.work.max_tokens)  # then it fits the largest cache
        prefilled = [engine.prefill_row(r.work.prompt_ids) for r in joining]
        shape = self._shape_for(live + joining)
        if shape == self.shape:
            self._fill_free_positions(joining, prefilled)
        else:
            self._move(shape, joining, prefilled)

    def step(self) -> list[RowUpdate]:
        rows = self._rows
        if not any(r is not None and r.finish is None for r in rows):
            return [RowUpdate(r.key, [], r.finish) for r in rows if r is not None]
        running = [r if r is not None and r.finish is None else None for r in rows]
        engine = self._engine
        chosen: dict[int, int] = {}
        logprobs: dict[int, TokenLogprob] = {}
        errors: dict[int, Exception] = {}  # a row's own sampling failure: it alone ends
        if any(r is not None and not r.work.plain for r in running):
            logits = engine.logits(self._h)
            for b, r in enumerate(running):
                if r is None or r.work.plain:
                    continue
                history = (*r.work.prompt_ids, *r.generated) if r.work.repetition_penalty != 1.0 else ()
                try:
                    chosen[b] = sampling.next_token(logits[b], r.work, r.produced, history)
                    if r.work.logprobs is not None:
                        logprobs[b] = sampling.token_logprob(logits[b], chosen[b], r.work.logprobs)
                except Exception as exc:
                    errors[b], chosen[b] = exc, engine.eos_id
        tokens, steps, self._h, self._caches = engine.decode_call(
            self._h, self._caches, running, chosen if chosen else None)
        eos = engine.eos_ids
        updates = []
        for b, r in enumerate(rows):
            if r is None:
                continue
            if b in errors:
                r.finish = "eos_token"  # it makes nothing more; the caller filters it out
                updates.append(RowUpdate(r.key, [], error=errors[b]))
                continue
            new: list[int] = []
            for token in tokens[b, :steps] if r.finish is None else ():
                if token in eos:
                    r.finish = "eos_token"
                    break
                new.append(int(token))
                r.generated.append(int(token))
                r.produced += 1
                if r.produced >= r.work.max_tokens:
                    r.finish = "length"
                    break
            # A row beyond plain sampling runs one step a call: its token's log-probability is this call's.
            updates.append(RowUpdate(r.key, new, r.finish, [logprobs[b]] if b in logprobs else
                                     ([] if r.work.logprobs is not None else None)))
        return updates

    def filter(self, keys: Sequence[Hashable]) -> None:
        kept = set(keys)
        missing = kept - set(self.keys)
        if missing:
            raise KeyError(f"not in the batch: {sorted(map(repr, missing))}")
        self._rows = [r if r is not None and r.key in kept else None for r in self._rows]
        live = [r for r in self._rows if r is not None]
        if not live:
            self._rows, self._h, self._caches = [], None, ()
            memory.release_free_heap()
            return
        batch, cache = self._shape_for(live)
        if (batch, cache) != self.shape:
            # The rows left stop paying for the ones that went: move them to a smaller shape.
            self._move((batch, cache), [], [])
            self._engine.compactions += 1
            memory.release_free_heap()

    def _shape_for(self, rows: list[_Row]) -> tuple[int, int]:
        buckets = self._engine.buckets
        return (buckets.batch_bucket(len(rows)),
                buckets.cache_bucket(max(buckets.slots_needed(r.work) for r in rows)))

    def _fill_free_positions(self, joining: list[_Row], prefilled: list) -> None:
        """Joining rows take free positions of the current shape (one copy of the cache)."""
        _, cache = self.shape
        free = [b for b, r in enumerate(self._rows) if r is None][: len(joining)]
        index = tf.constant([[b] for b in free], tf.int32)
        self._h = tf.tensor_scatter_nd_update(self._h, index, tf.concat([h for h, _ in prefilled], 0))
        self._caches = tuple(
            tuple(tf.tensor_scatter_nd_update(old, index, tf.concat([_fit(c[layer][kv], cache) for _, c in prefilled], 0))
                  for kv, old in enumerate(pair))
            for layer, pair in enumerate(self._caches))
        for b, r in zip(free, joining):
            self._rows[b] = r

    def _move(self, shape: tuple[int, int], joining: list[_Row], prefilled: list) -> None:
        """Rebuild the batch at `shape`: the rows staying first, then the joining ones, then
        fillers (zeros: masked slots must hold finite values)."""
        batch, cache = shape
        stay = [b for b, r in enumerate(self._rows) if r is not None]
        fillers = batch - len(stay) - len(joining)
        index = tf.constant(stay, tf.int32)
        whole = stay == list(range(len(self._rows)))  # every old position stays, in order

        def assemble(old, new_parts, fit=lambda x: x):
            parts = []
            if stay:
                parts.append(fit(old if whole else tf.gather(old, index)))
            parts += [fit(p) for p in new_parts]
            if fillers:
                parts.append(tf.zeros([fillers, *parts[0].shape[1:]]))
            return tf.concat(parts, 0) if len(parts) > 1 else parts[0]

        self._h = assemble(self._h, [h for h, _ in prefilled])
        caches = []
        for layer in range(self._engine.n_layer):
            pair = []
            for kv in range(2):
                old = self._caches[layer][kv] if self._caches else None
                pair.append(assemble(old, [c[layer][kv] for _, c in prefilled], lambda x: _fit(x, cache)))
            caches.append(tuple(pair))
        self._caches = tuple(caches)
        self._rows = [self._rows[b] for b in stay] + joining + [None] * fillers


def _fit(cache, size: int):
    """A cache [rows, heads, slots, head_dim] cut or zero-padded to `size` slots."""
    have = cache.shape[2]
    if have == size:
        return cache
    if have > size:
        return cache[:, :, :size]
    return tf.pad(cache, [[0, 0], [0, 0], [0, size - have], [0, 0]])


class TFGPT2Engine(Engine):
    """A GPT-2-family model served from a local directory by the compiled decode loop."""

    backend = "tf"

    def __init__(self, model_dir: Path, *, max_batch_size: int = 8, prefill_chunk: int = 16,
                 decode_chunk: int = 16, smallest_cache: int = 128):
        # Before the tokenizer and weights: another family's directory has no tf_model.h5 to load.
        _check_family(*model_type(model_dir))
        self._tokenizer = GPT2TokenizerFast.from_pretrained(model_dir).backend_tokenizer
        self.byte_fallback_ids = byte_fallback_ids(self._tokenizer)
        self.model = TFGPT2LMHeadModel.from_pretrained(model_dir)
        config = self.model.config
        _check_supported(config)
        self.eos_id, self.eos_ids = end_of_sequence_ids(model_dir, primary=int(config.eos_token_id))
        self.context_window = int(config.n_positions)
        self.vocab_size = int(config.vocab_size)
        self.max_batch_size = max_batch_size
        self.head_dim = config.n_embd // config.n_head
        self.n_head = config.n_head
        self.n_layer = config.n_layer
        self.decode_chunk = decode_chunk
        self.buckets = Buckets.for_model(self.context_window, max_batch_size, prefill_chunk, smallest_cache)

        transformer = self.model.transformer
        self._wte = transformer.wte.embeddings
        self._wpe = transformer.wpe.embeddings
        self._blocks = transformer.h
        self._ln_f = transformer.ln_f
        # Each program is traced once, with the batch and cache sizes left open, and XLA compiles
        # it once per concrete shape. A trace per shape would keep a graph per shape in memory
        # (about 20 MB each for DistilGPT2). Tensors only as arguments: a Python number would be
        # baked into the trace.
        embd, heads, head_dim = config.n_embd, self.n_head, self.head_dim
        rows = tf.TensorSpec([None], tf.int32)
        cache = tf.TensorSpec([None, heads, None, head_dim], tf.float32)
        caches = tuple((cache, cache) for _ in range(config.n_layer))
        self._prefill = tf.function(self._prefill_chunk, jit_compile=True, input_signature=[
            tf.TensorSpec([1, prefill_chunk], tf.int32), tf.TensorSpec([], tf.int32), caches])
        self._decode = tf.function(self._decode_steps, jit_compile=True, input_signature=[
            tf.TensorSpec([None, 1, embd], tf.float32), rows, caches,
            tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.uint64), tf.TensorSpec([None], tf.uint64),
            rows, rows, tf.TensorSpec([None], tf.bool), rows])
        self._logits_program = tf.function(self._logits, jit_compile=True, input_signature=[
            tf.TensorSpec([None, 1, embd], tf.float32)])
        self._shapes: set[tuple[str, int, int]] = set()  # (program, batch, cache) compiled so far
        self._shapes_at_warmup: int | None = None
        self.compactions = 0  # times rows leaving moved a batch to a smaller shape
        self._batch: TFDecodeBatch | None = None  # the latest from `new_batch`: the one the gauges read

    # --- Engine interface -------------------------------------------------------------------

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=special_tokens).ids
        return ids or [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def warmup(self) -> None:
        """Compile prefill for every cache size and decode for every (batch, cache) pair, so
        no join or leave compiles."""
        started = time.monotonic()
        chunk = self.buckets.prefill_chunk
        for cache in self.buckets.cache_sizes:
            t0 = time.monotonic()
            self._run_prefill(tf.zeros([1, chunk], tf.int32), 0, self._empty_cache(1, cache))
            for batch in self.buckets.batch_sizes:
                if cache == self.buckets.cache_sizes[0]:
                    self.logits(tf.zeros([batch, 1, self.model.config.n_embd]))
                self.decode_call(tf.zeros([batch, 1, self.model.config.n_embd]), self._empty_cache(batch, cache),
                            [None] * batch)
            log.info("compiled cache %d (prefill and %d batch sizes) in %.1f s", cache,
                     len(self.buckets.batch_sizes), time.monotonic() - t0)
        self._shapes_at_warmup = len(self._shapes)
        memory.release_free_heap()
        log.info("warm-up compiled %d programs in %.1f s", len(self._shapes), time.monotonic() - started)

    def compiles_after_warmup(self) -> int:
        if self._shapes_at_warmup is None:
            return 0
        return len(self._shapes) - self._shapes_at_warmup

    def new_batch(self) -> TFDecodeBatch:
        self._batch = TFDecodeBatch(self)
        return self._batch

    # --- memory (service/memory.py measures the budget; the scheduler admits by it) ----------

    @property
    def slot_bytes(self) -> int:
        """Bytes of one row's cache slot: a key and a value per layer, float32."""
        return self.n_layer * 2 * self.n_head * self.head_dim * 4

    def batch_bytes(self, rows: Sequence[GenerationRow]) -> int:
        """The batch's compiled shape (the batch bucket of its rows x the cache bucket of its
        most demanding row), held CACHE_COPIES times at once: the batch's caches, the decode
        call's result (XLA does not write into its inputs) and the copy its loop carries, or
        during `_move` the old caches, the new ones and a layer's gather and pad; plus the
        joining rows' prefilled caches (all of them are prefilled before they enter) and one
        more for the prefill running."""
        if not rows:
            return 0
        b = self.buckets
        batch = b.batch_bucket(len(rows))
        cache = b.cache_bucket(max(b.slots_needed(r) for r in rows))
        prompts = [b.cache_bucket(b.prompt_slots(len(r.prompt_ids))) for r in rows]  # as `prefill_row` sizes them
        return self.slot_bytes * (CACHE_COPIES * batch * cache + sum(prompts) + max(prompts))

    def kv_slots_used(self) -> int:
        batch = self._batch
        return sum(r.length for r in batch._rows if r is not None) if batch is not None else 0

    def kv_bytes_reserved(self) -> int:
        """The running batch's caches at its compiled shape; 0 when it holds no row."""
        batch = self._batch
        if batch is None or not batch.keys:
            return 0
        rows, cache = batch.shape
        return rows * cache * self.slot_bytes

    # --- The host side of the two programs ----------------------------------------------------

    def prefill_row(self, prompt_ids: Sequence[int]):
        """One prompt alone into a cache of its own: (hidden state of its last token [1, 1, embd],
        caches [1, heads, cache, head_dim]), the cache the smallest bucket its chunks fit."""
        n, chunk = len(prompt_ids), self.buckets.prefill_chunk
        slots = self.buckets.prompt_slots(n)
        tokens = np.full([1, slots], self.eos_id, np.int32)
        tokens[0, :n] = prompt_ids
        caches = self._empty_cache(1, self.buckets.cache_bucket(slots))
        for start in range(0, slots, chunk):
            x, caches = self._run_prefill(tf.constant(tokens[:, start:start + chunk]), start, caches)
        last = n - 1 - (slots - chunk)  # the last real token's place in the last chunk
        return x[:, last:last + 1], caches

    def decode_call(self, h, caches, rows: Sequence[_Row | None], chosen: dict[int, int] | None = None):
        """One decode call over a batch whose position b holds `rows[b]` (None: skip it).
        With `chosen` (position: token), one step only, in which those positions take the
        tokens given and the others sample as usual.
        Returns (tokens [batch, decode_chunk] as numpy, steps run, h, caches)."""
        def column(value, filler, dtype):
            return tf.constant(np.array([filler if r is None else value(r) for r in rows], dtype))

        chosen = chosen or {}
        limit = (lambda r: r.produced + 1) if chosen else (lambda r: r.work.max_tokens)
        self._note_shape("decode", caches)
        tokens, steps, h, caches = self._decode(
            h, column(lambda r: r.length, 0, np.int32), caches,
            column(lambda r: r.work.temperature, 0.0, np.float32),
            column(lambda r: r.work.seed, 0, np.uint64),
            column(lambda r: r.work.stream << 32, 0, np.uint64),
            column(lambda r: r.produced, 0, np.int32),
            column(limit, 1, np.int32),
            column(lambda r: False, True, np.bool_),
            tf.constant(np.array([chosen.get(b, -1) for b in range(len(rows))], np.int32)))
        return tokens.numpy(), int(steps), h, caches

    def logits(self, h) -> np.ndarray:
        """The logits [batch, vocab] (float32) each row's next token is chosen from."""
        self._note_shape("logits", int(h.shape[0]), 0)
        return self._logits_program(h).numpy()

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
        # transformers' own forward, eagerly: a prompt is scored once, so compiling buys nothing.
        logits = self.model(tf.constant([list(prompt_ids)], tf.int32)).logits[0].numpy()
        return [None] + [sampling.token_logprob(logits[i - 1], prompt_ids[i], top) for i in range(1, len(prompt_ids))]

    def _run_prefill(self, tokens, start: int, caches):
        self._note_shape("prefill", caches)
        return self._prefill(tokens, tf.constant(start, tf.int32), caches)

    def _note_shape(self, program: str, caches_or_batch, cache: int = 0) -> None:
        """XLA compiles a program once per shape, and (batch, cache) fixes every input's shape."""
        if isinstance(caches_or_batch, int):
            batch = caches_or_batch
        else:
            batch, _, cache, _ = caches_or_batch[0][0].shape
        shape = (program, int(batch), int(cache))
        if shape not in self._shapes:
            self._shapes.add(shape)
            if self._shapes_at_warmup is not None:
                log.warning("compiling %s for batch %d x cache %d after warm-up", program, batch, cache)

    # --- Compiled programs ------------------------------------------------------------------

    def _prefill_chunk(self, tokens, start, caches):
        """One chunk of one prompt into cache slots start..start+chunk-1; returns the chunk's
        hidden states [1, chunk, embd]."""
        at = tf.stack([0, 0, start, 0])
        return self._forward(tokens, start[None], caches, lambda cache, new: xla.dynamic_update_slice(cache, new, at))

    def _decode_steps(self, h, length, caches, temperature, seed, stream, generated, max_new, done, forced):
        """Up to `decode_chunk` steps: sample from `h`'s logits, record, forward the token into
        each row's next slot (`length`, its filled slots). Rows marked done only ride along.
        A row whose `forced` is a token (not -1) takes it instead of sampling (one step: the host
        chose it)."""
        batch = tf.shape(h)[0]
        steps = self.decode_chunk
        out = tf.fill([batch, steps], self.eos_id)

        def running(i, h, length, caches, generated, done, out):
            return (i < steps) & ~tf.reduce_all(done)

        def step(i, h, length, caches, generated, done, out):
            token = self._sample(self._logits(h), temperature, seed, stream, generated)
            token = tf.where(forced >= 0, forced, token)
            token = tf.where(done, self.eos_id, token)
            out = xla.dynamic_update_slice(out, token[:, None], tf.stack([0, i]))
            generated += tf.cast(~done, tf.int32)
            done = done | self._is_eos(token) | (generated >= max_new)
            h, caches = self._forward(token[:, None], length, caches, self._write_at(length))
            # A finished row's slot does not advance: its cache must not run past its bucket.
            return i + 1, h, length + tf.cast(~done, tf.int32), caches, generated, done, out

        i, h, _, caches, _, _, out = tf.while_loop(
            running, step, (tf.constant(0), h, length, caches, generated, done, out))
        return out, i, h, caches

    def _is_eos(self, token):
        """Whether each row's token ends it (any of `eos_ids`: a constant of the trace)."""
        eos = tf.constant(sorted(self.eos_ids), tf.int32)
        return tf.reduce_any(token[:, None] == eos[None, :], axis=1)

    def _write_at(self, length):
        """Writes one new key or value per row, [batch, heads, 1, head_dim], at the row's own slot.

        A scatter updates the loop's cache in place. A select against one_hot(length) rewrites
        the whole cache every step: on DistilGPT2 it cost 1.4x the CPU time of a 16-step call
        at batch 1 x cache 1040 (660 ms against 455), and never less than the scatter.
        """
        def write(cache, new):
            batch = tf.shape(cache)[0]
            rows = tf.repeat(tf.range(batch), self.n_head)
            heads = tf.tile(tf.range(self.n_head), [batch])
            index = tf.stack([rows, heads, tf.repeat(length, self.n_head)], axis=1)
            return tf.tensor_scatter_nd_update(cache, index, tf.reshape(new, [-1, self.head_dim]))
        return write

    def _forward(self, tokens, first, caches, write):
        """Run tokens [batch, T] through every block; row b's tokens go to cache slots (and
        positions) first[b]..first[b]+T-1, written by `write(cache, new)`. Each token attends to
        its row's slots up to its own. Returns the hidden states [batch, T, embd]."""
        length = tf.shape(tokens)[1]
        cache_size = tf.shape(caches[0][0])[2]
        slots = first[:, None] + tf.range(length)[None, :]
        # A right-padded chunk's padding may run past the window: its positions are never used.
        positions = tf.minimum(slots, self.context_window - 1)
        visible = tf.range(cache_size)[None, None, :] <= slots[:, :, None]
        visible = visible[:, None]  # [batch, 1 (heads), T, cache]
        x = tf.gather(self._wte, tokens) + tf.gather(self._wpe, positions)
        updated = []
        for block, (k_cache, v_cache) in zip(self._blocks, caches):
            x, k_cache, v_cache = self._block(block, x, k_cache, v_cache, write, visible)
            updated.append((k_cache, v_cache))
        return x, tuple(updated)

    def _block(self, block, x, k_cache, v_cache, write, visible):
        """transformers' TFBlock with attention over the fixed cache instead of a growing one."""
        attn = block.attn
        q, k, v = tf.split(attn.c_attn(block.ln_1(x)), 3, axis=2)
        q, k, v = attn.split_heads(q), attn.split_heads(k), attn.split_heads(v)
        k_cache, v_cache = write(k_cache, k), write(v_cache, v)
        w = tf.matmul(q, k_cache, transpose_b=True) / math.sqrt(self.head_dim)
        w = stable_softmax(tf.where(visible, w, MASKED), axis=-1)
        x = x + attn.c_proj(attn.merge_heads(tf.matmul(w, v_cache)))
        return x + block.mlp(block.ln_2(x), training=False), k_cache, v_cache

    def _logits(self, h):
        return tf.matmul(self._ln_f(h)[:, 0], self._wte, transpose_b=True)

    def _sample(self, logits, temperature, seed, stream, generated):
        """Greedy where temperature is 0, else a draw from softmax(logits / temperature).

        Inverse-CDF sampling with one uniform number per row, searched in two levels (blocks of
        the vocabulary, then within the chosen block), so a draw costs one pass over the logits
        rather than a random number per vocabulary entry. The uniform is counter-based Philox:
        the key is the row's seed, the counter's high word is (stream << 32) + token index. XLA
        ignores the seeds of stateful random ops, the legacy stateless ops keep only 32 bits of
        an int64 seed under XLA, and a row must not depend on its neighbours.
        """
        greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
        batch, vocab = tf.shape(logits)[0], logits.shape[1]
        n_blocks = -(-vocab // SAMPLE_BLOCK)

        def draw():
            scaled = logits / tf.maximum(temperature, 1e-6)[:, None]
            weights = tf.exp(scaled - tf.reduce_max(scaled, axis=-1, keepdims=True))
            weights = tf.pad(weights, [[0, 0], [0, n_blocks * SAMPLE_BLOCK - vocab]])
            blocks = tf.reshape(weights, [batch, n_blocks, SAMPLE_BLOCK])
            block_sums = tf.reduce_sum(blocks, axis=-1)
            cumulative = tf.matmul(block_sums, _upper_ones(n_blocks))  # inclusive prefix sums
            target = self._uniform(seed, stream, generated) * cumulative[:, -1]
            block = tf.minimum(_count_at_most(cumulative, target), n_blocks - 1)
            before = tf.gather(cumulative - block_sums, block, batch_dims=1)
            within = tf.gather(blocks, block, batch_dims=1)
            index = _count_at_most(before[:, None] + tf.matmul(within, _upper_ones(SAMPLE_BLOCK)), target)
            # Rounding can put the target past the block's last token: take that token then.
            last = SAMPLE_BLOCK - 1 - tf.argmax(tf.reverse(tf.cast(within > 0, tf.int32), [1]), axis=1,
                                                output_type=tf.int32)
            sampled = block * SAMPLE_BLOCK + tf.minimum(index, last)
            return tf.where(temperature > 0, sampled, greedy)

        # An all-greedy batch skips the draw.
        return tf.cond(tf.reduce_any(temperature > 0), draw, lambda: greedy)

    def _uniform(self, seed, stream, generated):
        """One number in [0, 1) per row from the Philox stream (seed, stream + token index)."""
        high = stream + tf.cast(generated, tf.uint64)
        low = tf.zeros([], tf.uint64)

        def one(key_and_high):
            key, row_high = key_and_high
            return tf.raw_ops.StatelessRandomUniformV2(shape=[1], key=key[None], counter=tf.stack([low, row_high]),
                                                       alg=PHILOX, dtype=tf.float32)[0]

        return tf.map_fn(one, (seed, high), fn_output_signature=tf.float32)

    def _empty_cache(self, batch: int, cache_size: int):
        shape = [batch, self.n_head, cache_size, self.head_dim]
        return tuple((tf.zeros(shape), tf.zeros(shape)) for _ in self._blocks)


def _upper_ones(n: int) -> tf.Tensor:
    """x @ this = inclusive prefix sums of x (cheaper under XLA on CPU than a long cumsum)."""
    return tf.linalg.band_part(tf.ones([n, n]), 0, -1)


def _count_at_most(cumulative, target):
    """Per row, how many prefix sums are <= target: the index of the first one above it."""
    return tf.reduce_sum(tf.cast(cumulative <= target[:, None], tf.int32), axis=1)


_LIBC = memory.glibc()
if _LIBC is not None:
    # glibc raises its mmap threshold each time a large buffer is freed, after which buffers of
    # that size stay on the heap (mallopt(3), M_MMAP_THRESHOLD). A fixed 32 MiB sends caches and
    # other large per-batch buffers to mmap, returned to the OS when freed; a lower one would
    # also send XLA's per-step temporaries there, which costs 3x in page faults at batch 8.
    _LIBC.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD


def use_persistent_compile_cache(directory: Path) -> None:
    """Keep compiled XLA programs in `directory`, so a restart loads instead of compiling.

    TensorFlow reads this flag from TF_XLA_FLAGS when it first compiles, so it must be set
    before the first compiled call. https://www.tensorflow.org/xla (tf_xla_persistent_cache_directory)
    """
    directory.mkdir(parents=True, exist_ok=True)
    flag = f"--tf_xla_persistent_cache_directory={directory}"
    current = os.environ.get("TF_XLA_FLAGS", "")
    if "tf_xla_persistent_cache_directory" not in current:
        os.environ["TF_XLA_FLAGS"] = f"{current} {flag}".strip()


def _check_family(kind: str, architectures: Sequence[str] | None = ()) -> None:
    """Refuse another family than GPT-2, in the words Settings refuses BACKEND=tf with."""
    if kind != "gpt2":
        raise ValueError(f"the TensorFlow GPT-2 engine serves the GPT-2 family only; the model is "
                         f"{describe_model(kind, tuple(architectures or ()))}")


def _check_supported(config) -> None:
    """The loop re-implements GPT-2 attention; refuse variants it does not implement."""
    _check_family(config.model_type, config.architectures)
    for flag in ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise ValueError(f"GPT-2 option {flag} is not supported")
    if not getattr(config, "scale_attn_weights", True):
        raise ValueError("GPT-2 option scale_attn_weights=False is not supported")
