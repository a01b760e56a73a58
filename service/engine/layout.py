"""Which compiled shape a batch runs in: pure Python, testable without a model.

Every compiled program has a fixed shape (batch size x cache slots), so a batch is padded up to
the nearest bucket: filler rows that start finished, and cache slots no row reaches yet. Rows
are not padded to one length: each row keeps its own slots and positions, so a row joins or
leaves a running batch without moving the others, and the batch's cache bucket only has to hold
its most demanding row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        do. The largest cache holds the window plus one prefill chunk: a prompt is prefilled in
        whole chunks, the last one right-padded, so its slots may run up to `prefill_chunk - 1`
        past its tokens.
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

    def prompt_slots(self, prompt_tokens: int) -> int:
        """Slots a prompt's prefill writes: whole chunks."""
        return math.ceil(prompt_tokens / self.prefill_chunk) * self.prefill_chunk

    def slots_needed(self, row: GenerationRow) -> int:
        """Cache slots a row needs from joining to its end: its prefill's whole chunks, and one
        slot a token (its prompt's, then each new one's) up to `max_tokens`."""
        n = len(row.prompt_ids)
        return max(self.prompt_slots(n), n + row.max_tokens)
