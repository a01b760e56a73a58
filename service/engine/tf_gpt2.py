"""The TensorFlow backend: GPT-2 prefill and decode over a fixed-shape key/value cache, XLA-compiled.

transformers supplies the model (TFGPT2LMHeadModel: its layers and weights). This module owns
the loop around it: the cache, attention over the cache, sampling and stopping. transformers'
own `generate` can't give per-row sampling parameters, streaming or a second backend under XLA.

Two programs are compiled per (batch size, cache size) bucket:
- prefill: one chunk of `prefill_chunk` prompt tokens into the cache;
- decode: up to `decode_chunk` steps of sample-then-forward in one call, so Python's per-call
  cost is paid once per chunk. Inside a call the cache is a loop variable updated in place
  with dynamic-update-slice; it is copied once per call, not once per step.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.compiler.tf2xla.python import xla  # noqa: E402
from transformers import GPT2TokenizerFast, TFGPT2LMHeadModel  # noqa: E402
from transformers.tf_utils import stable_softmax  # noqa: E402

from service.engine.base import Engine, GenerationRow  # noqa: E402
from service.engine.layout import BatchLayout, Buckets  # noqa: E402

log = logging.getLogger(__name__)

# transformers' TF GPT-2 masks with -1e4 (modeling_tf_gpt2.py); the same value keeps results equal.
MASKED = -1e4
PHILOX = 1  # tf.random.Algorithm.PHILOX
SAMPLE_BLOCK = 256  # vocabulary entries per block in the two-level sampling search


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode program carries for a batch, one entry a batch position."""

    h: tf.Tensor
    pad: tf.Tensor
    caches: tuple
    temperature: tf.Tensor
    seed: tf.Tensor
    stream: tf.Tensor
    generated: tf.Tensor
    max_new: tf.Tensor
    done: tf.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.h.shape[0])

    def select(self, positions: list[int], batch_size: int) -> DecodeState:
        """Keep these batch positions, padded to `batch_size` with finished copies of the first."""
        index = tf.constant(positions + [positions[0]] * (batch_size - len(positions)))
        done = np.ones([batch_size], np.bool_)
        done[: len(positions)] = self.done.numpy()[positions]
        taken = {f.name: tf.gather(getattr(self, f.name), index)
                 for f in dataclasses.fields(self) if f.name not in ("caches", "done")}
        caches = tuple((tf.gather(k, index), tf.gather(v, index)) for k, v in self.caches)
        return DecodeState(**taken, caches=caches, done=tf.constant(done))


class TFGPT2Engine(Engine):
    """A GPT-2-family model served from a local directory by the compiled decode loop."""

    backend = "tf"

    def __init__(self, model_dir: Path, *, max_batch_size: int = 8, prefill_chunk: int = 16,
                 decode_chunk: int = 16, smallest_cache: int = 128):
        self._tokenizer = GPT2TokenizerFast.from_pretrained(model_dir).backend_tokenizer
        self.model = TFGPT2LMHeadModel.from_pretrained(model_dir)
        config = self.model.config
        _check_supported(config)
        self.eos_id = int(config.eos_token_id)
        self.context_window = int(config.n_positions)
        self.head_dim = config.n_embd // config.n_head
        self.n_head = config.n_head
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
        scalar = tf.TensorSpec([], tf.int32)
        self._prefill = tf.function(self._prefill_chunk, jit_compile=True, input_signature=[
            tf.TensorSpec([None, prefill_chunk], tf.int32), scalar, rows, caches])
        self._decode = tf.function(self._decode_steps, jit_compile=True, input_signature=[
            tf.TensorSpec([None, 1, embd], tf.float32), scalar, rows, caches,
            tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.uint64), tf.TensorSpec([None], tf.uint64),
            rows, rows, tf.TensorSpec([None], tf.bool)])
        self._shapes: set[tuple[str, int, int]] = set()  # (program, batch, cache) compiled so far
        self._shapes_at_warmup: int | None = None
        self.compactions = 0  # times finished rows were dropped to a smaller batch shape

    # --- Engine interface -------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids or [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def warmup(self) -> None:
        """Compile prefill and decode for every bucket, so no request compiles."""
        started = time.monotonic()
        for batch in self.buckets.batch_sizes:
            for cache in self.buckets.cache_sizes:
                t0 = time.monotonic()
                caches = self._empty_cache(batch, cache)
                pad = tf.zeros([batch], tf.int32)
                tokens = tf.zeros([batch, self.buckets.prefill_chunk], tf.int32)
                h, caches = self._run_prefill(tokens, 0, pad, caches)
                zeros_i = tf.zeros([batch], tf.int32)
                zeros_s = tf.zeros([batch], tf.uint64)
                self._run_decode(h, 0, pad, caches, tf.zeros([batch]), zeros_s, zeros_s,
                                 zeros_i, zeros_i + 1, tf.ones([batch], tf.bool))
                log.info("compiled batch %d x cache %d in %.1f s", batch, cache, time.monotonic() - t0)
        self._shapes_at_warmup = len(self._shapes)
        _release_free_memory()
        log.info("warm-up compiled %d programs in %.1f s", len(self._shapes), time.monotonic() - started)

    def compiles_after_warmup(self) -> int:
        if self._shapes_at_warmup is None:
            return 0
        return len(self._shapes) - self._shapes_at_warmup

    def generate(self, rows: Sequence[GenerationRow]) -> list[list[int]]:
        results: list[list[int]] = [[] for _ in rows]
        for group in self.buckets.split(rows):
            for i, ids in zip(group, self._generate_group([rows[i] for i in group])):
                results[i] = ids
        # Without this the resident memory of a busy server grows by about 300 MB (DistilGPT2).
        _release_free_memory()
        return results

    # --- The host side of the loop ----------------------------------------------------------

    def _generate_group(self, rows: Sequence[GenerationRow]) -> list[list[int]]:
        layout = BatchLayout.build(rows, self.buckets, self.eos_id)
        chunk = self.buckets.prefill_chunk
        pad = tf.constant(layout.pad)
        caches = self._empty_cache(layout.batch_size, layout.cache_size)
        for start in range(0, layout.prompt_slots, chunk):
            tokens = tf.constant(layout.tokens[:, start:start + chunk])
            h, caches = self._run_prefill(tokens, start, pad, caches)

        state = DecodeState(
            h=h, pad=pad, caches=caches,
            temperature=tf.constant(layout.column([r.temperature for r in rows], 0.0, np.float32)),
            seed=tf.constant(layout.column([r.seed for r in rows], 0, np.uint64)),
            stream=tf.constant(layout.column([r.stream << 32 for r in rows], 0, np.uint64)),
            generated=tf.zeros([layout.batch_size], tf.int32),
            max_new=tf.constant(layout.column([r.max_tokens for r in rows], 1, np.int32)),
            done=tf.constant(layout.column([False] * len(rows), True, np.bool_)),
        )
        outputs: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        live = list(range(len(rows)))  # the row at each batch position
        slot = layout.prompt_slots
        while True:
            tokens, steps, state = self._decode_chunk(state, slot)
            slot += steps
            for b, r in enumerate(live):
                for token in tokens[b, :steps]:
                    if finished[r]:
                        break
                    if token == self.eos_id:
                        finished[r] = True
                        break
                    outputs[r].append(int(token))
                    finished[r] = len(outputs[r]) >= rows[r].max_tokens
            keep = [b for b, r in enumerate(live) if not finished[r]]
            if not keep:
                return outputs
            smaller = self.buckets.batch_bucket(len(keep))
            if smaller < state.batch_size:
                # Finished rows stop costing work: move the rest to a smaller compiled shape.
                state = state.select(keep, smaller)
                live = [live[b] for b in keep]
                self.compactions += 1

    def _decode_chunk(self, state: DecodeState, slot: int) -> tuple[np.ndarray, int, DecodeState]:
        tokens, steps, h, caches, generated, done = self._run_decode(
            state.h, slot, state.pad, state.caches, state.temperature,
            state.seed, state.stream, state.generated, state.max_new, state.done)
        state = dataclasses.replace(state, h=h, caches=caches, generated=generated, done=done)
        return tokens.numpy(), int(steps), state

    # --- Compiled programs ------------------------------------------------------------------

    def _run_prefill(self, tokens, start: int, pad, caches):
        self._note_shape("prefill", caches)
        return self._prefill(tokens, tf.constant(start, tf.int32), pad, caches)

    def _run_decode(self, h, slot: int, pad, caches, *rest):
        self._note_shape("decode", caches)
        return self._decode(h, tf.constant(slot, tf.int32), pad, caches, *rest)

    def _note_shape(self, program: str, caches) -> None:
        """XLA compiles a program once per shape, and (batch, cache) fixes every input's shape."""
        batch, _, cache, _ = caches[0][0].shape
        shape = (program, batch, cache)
        if shape not in self._shapes:
            self._shapes.add(shape)
            if self._shapes_at_warmup is not None:
                log.warning("compiling %s for batch %d x cache %d after warm-up", program, batch, cache)

    def _prefill_chunk(self, tokens, start, pad, caches):
        """Write one chunk of prompt tokens into the cache; return the last hidden state."""
        return self._forward(tokens, start, pad, caches)

    def _decode_steps(self, h, slot, pad, caches, temperature, seed, stream, generated, max_new, done):
        """Up to `decode_chunk` steps: sample from `h`'s logits, record, forward the token."""
        batch = tf.shape(h)[0]
        steps = self.decode_chunk
        out = tf.fill([batch, steps], self.eos_id)

        def running(i, h, slot, caches, generated, done, out):
            return (i < steps) & ~tf.reduce_all(done)

        def step(i, h, slot, caches, generated, done, out):
            token = self._sample(self._logits(h), temperature, seed, stream, generated)
            token = tf.where(done, self.eos_id, token)
            out = xla.dynamic_update_slice(out, token[:, None], tf.stack([0, i]))
            generated += tf.cast(~done, tf.int32)
            done = done | (token == self.eos_id) | (generated >= max_new)
            h, caches = self._forward(token[:, None], slot, pad, caches)
            return i + 1, h, slot + 1, caches, generated, done, out

        i, h, _, caches, generated, done, out = tf.while_loop(
            running, step, (tf.constant(0), h, slot, caches, generated, done, out))
        return out, i, h, caches, generated, done

    def _forward(self, tokens, start, pad, caches):
        """Run tokens [batch, T] placed at cache slots start..start+T-1 through every block.

        Row b's prompt starts at slot pad[b]; its positions count from there, and it attends to
        slots from pad[b] up to each token's own.
        """
        length = tf.shape(tokens)[1]
        cache_size = tf.shape(caches[0][0])[2]
        slots = start + tf.range(length)
        positions = tf.clip_by_value(slots[None, :] - pad[:, None], 0, self.context_window - 1)
        keys = tf.range(cache_size)
        visible = (keys[None, None, :] >= pad[:, None, None]) & (keys[None, None, :] <= slots[None, :, None])
        visible = visible[:, None]  # [batch, 1 (heads), T, cache]
        x = tf.gather(self._wte, tokens) + tf.gather(self._wpe, positions)
        updated = []
        for block, (k_cache, v_cache) in zip(self._blocks, caches):
            x, k_cache, v_cache = self._block(block, x, k_cache, v_cache, start, visible)
            updated.append((k_cache, v_cache))
        return x[:, -1:], tuple(updated)  # [batch, 1, embd]: the layers keep their built rank

    def _block(self, block, x, k_cache, v_cache, start, visible):
        """transformers' TFBlock with attention over the fixed cache instead of a growing one."""
        attn = block.attn
        q, k, v = tf.split(attn.c_attn(block.ln_1(x)), 3, axis=2)
        q, k, v = attn.split_heads(q), attn.split_heads(k), attn.split_heads(v)
        at = tf.stack([0, 0, start, 0])
        k_cache = xla.dynamic_update_slice(k_cache, k, at)
        v_cache = xla.dynamic_update_slice(v_cache, v, at)
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


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: leave the allocator as it is
        return None


_LIBC = _glibc()
if _LIBC is not None:
    # glibc raises its mmap threshold each time a large buffer is freed, after which buffers of
    # that size stay on the heap (mallopt(3), M_MMAP_THRESHOLD). A fixed 32 MiB sends caches and
    # other large per-batch buffers to mmap, returned to the OS when freed; a lower one would
    # also send XLA's per-step temporaries there, which costs 3x in page faults at batch 8.
    _LIBC.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (malloc_trim(3)): a batch's or warm-up's buffers
    would otherwise stay resident."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


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


def _check_supported(config) -> None:
    """The loop re-implements GPT-2 attention; refuse variants it does not implement."""
    if config.model_type != "gpt2":
        raise ValueError(f"model_type {config.model_type!r} is not supported (only gpt2)")
    for flag in ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise ValueError(f"GPT-2 option {flag} is not supported")
    if not getattr(config, "scale_attn_weights", True):
        raise ValueError("GPT-2 option scale_attn_weights=False is not supported")
