"""Where a batch's rows sit in the compiled shapes: pure Python, testable without a model.

Every compiled program has a fixed shape (batch size x cache slots), so a batch is padded up
to the nearest bucket. Prompts are left-padded to a whole number of prefill chunks, so that
all rows' last prompt tokens share one cache slot and every decode step writes one slot for
the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.engine.base import GenerationRow


@dataclass(frozen=True)
class Buckets:
    """The shapes that are compiled: every batch meets one of them."""

    batch_sizes: tuple[int, ...]
    cache_sizes: tuple[int, ...]
    prefill_chunk: int

    @classmethod
    def for_model(cls, context_window: int, max_batch_size: int, prefill_chunk: int,
                  smallest_cache: int = 128) -> Buckets:
        """Batch sizes 1, then powers of two from 4 up to `max_batch_size`; cache sizes doubling
        from `smallest_cache` up to the window.

        Each (batch, cache) pair costs a few seconds of compiling at start. Batch 2 is left out:
        decoding a few rows is bound by reading the weights, so two rows cost about what four
        do. The largest cache holds the window plus one prefill chunk: a prompt is left-padded
        to whole chunks, so its slots may run up to `prefill_chunk - 1` past its tokens.
        """
        batch_sizes = {1, max_batch_size} | {2**i for i in range(2, max_batch_size.bit_length()) if 2**i <= max_batch_size}
        caches = []
        size = smallest_cache
        while size < context_window:
            caches.append(size)
            size *= 2
        caches.append(context_window + prefill_chunk)
        return cls(tuple(sorted(batch_sizes)), tuple(caches), prefill_chunk)

    @property
    def max_cache(self) -> int:
        return self.cache_sizes[-1]

    def batch_bucket(self, rows: int) -> int:
        return next(b for b in self.batch_sizes if b >= rows)

    def cache_bucket(self, slots: int) -> int:
        return next(s for s in self.cache_sizes if s >= slots)

    def prompt_slots(self, longest_prompt: int) -> int:
        return math.ceil(longest_prompt / self.prefill_chunk) * self.prefill_chunk

    def slots_needed(self, rows: Sequence[GenerationRow]) -> int:
        """Cache slots for these rows together: padded prompts, then one slot a new token."""
        longest = max(len(r.prompt_ids) for r in rows)
        return self.prompt_slots(longest) + max(r.max_tokens for r in rows)

    def split(self, rows: Sequence[GenerationRow]) -> list[list[int]]:
        """Indices of rows, in order, grouped so each group fits the largest shapes.

        A long prompt with few new tokens and a short prompt with many may each fit the
        context window and still not fit one cache together; they then run one after the other.
        """
        groups: list[list[int]] = []
        for i, row in enumerate(rows):
            if groups:
                candidate = [rows[j] for j in groups[-1]] + [row]
                if len(candidate) <= self.batch_sizes[-1] and self.slots_needed(candidate) <= self.max_cache:
                    groups[-1].append(i)
                    continue
            groups.append([i])
        return groups


@dataclass(frozen=True)
class BatchLayout:
    """A group of rows laid out for one compiled shape.

    `tokens[b]` is row b's prompt, left-padded with `pad_id` to `prompt_slots`; `pad[b]` is the
    number of padding slots in front of it. Rows past `len(rows)` are fillers that start
    finished.
    """

    rows: tuple[GenerationRow, ...]
    batch_size: int
    cache_size: int
    prompt_slots: int
    tokens: np.ndarray
    pad: np.ndarray

    @classmethod
    def build(cls, rows: Sequence[GenerationRow], buckets: Buckets, pad_id: int) -> BatchLayout:
        batch = buckets.batch_bucket(len(rows))
        prompt_slots = buckets.prompt_slots(max(len(r.prompt_ids) for r in rows))
        cache = buckets.cache_bucket(buckets.slots_needed(rows))
        tokens = np.full((batch, prompt_slots), pad_id, dtype=np.int32)
        pad = np.full((batch,), prompt_slots - 1, dtype=np.int32)
        for b, row in enumerate(rows):
            n = len(row.prompt_ids)
            tokens[b, prompt_slots - n:] = row.prompt_ids
            pad[b] = prompt_slots - n
        return cls(tuple(rows), batch, cache, prompt_slots, tokens, pad)

    def column(self, values: Sequence, filler, dtype) -> np.ndarray:
        """One value a row, fillers included, as an array of `batch_size`."""
        return np.array(list(values) + [filler] * (self.batch_size - len(values)), dtype=dtype)
