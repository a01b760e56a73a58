"""The key/value pool of a LiteRT batch: which slots each row owns, and what sizes the pool
takes and what they cost in memory.

Kept apart from the decoder that runs the model over the pool's arrays, as vLLM keeps its
block manager apart from its model runner. `Slots` is one pool's bookkeeping: the batch's
positions, the slots each row owns (anywhere in the pool), the free list, and where a new shape
puts the kept rows' slots. `PoolSizes` is the pool's buckets, how far it grows, and its worst-case
bytes, which memory-aware admission reads (`batch_bytes`) and the budget caps (`cap`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.engine.base import GenerationRow

HEADROOM_CALLS = 4  # a pool is sized for its rows' slots and this many more calls,
HEADROOM_SHARE = 4  # or a 1/this share more slots, if more: growing a pool moves every slot


def call_bytes(positions: int, groups: int, threads: int) -> int:
    """What a decode call holds per pool slot beside the pool: the mask (a float per position),
    the KVAttention kernel's list of each row's slots (an int32 per position) and its scores (a
    float per query head of a key/value head, per thread)."""
    return 4 * (2 * positions + groups * threads)


def cache_buckets(step: int, largest: int) -> tuple[int, ...]:
    """Pool sizes in multiples of `step` up to `largest`: attention costs what the allocated
    pool costs, so a batch takes the smallest that holds its rows' slots. Nothing is compiled
    per size, so the steps can be fine."""
    return (*range(step, largest, step), largest)


def slots_wanted(used: int, rows: int) -> int:
    """The slots a pool is sized for when its `rows` rows fill `used`: `HEADROOM_CALLS` more
    calls' worth (so that a pool just grown does not grow again at the next call) or a
    `1 / HEADROOM_SHARE` share more, whichever is more. Growing moves every filled slot (about
    40 ms at 2,000 DistilGPT2 slots), so a large pool grows by a share of its size: at 2,000
    slots and 5 rows, every 100 calls rather than every 25, for an eighth more slots read a
    call on average."""
    return used + max(rows * HEADROOM_CALLS, used // HEADROOM_SHARE)


@dataclass(frozen=True)
class Plan:
    """Where a new shape puts the kept rows' slots: `slots` per new position; `order`, the kept
    slots in their new order when they are packed at the pool's start (None: they stay where
    they are); `top`, the extent of the kept slots in the new pool; `used`, how many they are."""

    slots: list[list[int]]
    order: np.ndarray | None
    top: int
    used: int


class Slots:
    """One pool's bookkeeping: positions hold a row or are empty; row b owns `slots[b]` (in the
    order of its positions in its sequence); the rest are free, the lowest taken first."""

    def __init__(self):
        self.pool_size = 0
        self.live: list[bool] = []  # per position: does it hold a row
        self.slots: list[list[int]] = []  # per position: the row's slots, in order
        self._free: list[int] = []  # a heap: the lowest free slot first

    @property
    def lengths(self) -> np.ndarray:
        """Filled slots per position: a row's next token takes that position in its sequence."""
        return np.array([len(s) for s in self.slots], np.int64)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.pool_size - len(self._free)

    def plan(self, sources: Sequence[int | None], pool_size: int) -> Plan:
        """The slots of a new shape: position j takes the row at current position `sources[j]`
        (or is empty where it is None) over `pool_size` slots. Where the kept slots all fit
        the new pool they stay where they are (a growing pool's case), else they are packed at
        its start in position order."""
        kept = [self.slots[s] for s in sources if s is not None]
        used = sum(len(k) for k in kept)
        if used > pool_size:
            raise ValueError(f"the rows hold {used} slots, more than a pool of {pool_size}")
        top = 1 + max((slot for k in kept for slot in k), default=-1)
        if top <= pool_size:
            return Plan([list(self.slots[s]) if s is not None else [] for s in sources], None, top, used)
        order = np.array([slot for k in kept for slot in k], np.int64)
        counts = np.cumsum([0] + [len(self.slots[s]) if s is not None else 0 for s in sources])
        return Plan([list(range(counts[j], counts[j + 1])) for j in range(len(sources))], order, used, used)

    def take_shape(self, sources: Sequence[int | None], plan: Plan, pool_size: int) -> None:
        """Become the planned shape."""
        self.live, self.slots, self.pool_size = [s is not None for s in sources], plan.slots, pool_size
        taken = {slot for own in plan.slots for slot in own}
        self._free = [slot for slot in range(pool_size) if slot not in taken]  # sorted: already a heap

    def open(self, b: int) -> None:
        """Start a row at empty position b."""
        if self.live[b]:
            raise ValueError(f"position {b} holds a row")
        self.live[b] = True

    def close(self, b: int) -> list[int]:
        """End the row at position b; returns the slots it gave back to the free list."""
        own = self.slots[b]
        for slot in own:
            heapq.heappush(self._free, slot)
        self.slots[b], self.live[b] = [], False
        return own

    def take(self, n: int) -> list[int]:
        """n free slots, the lowest first (the caller gives them to rows: `give`)."""
        if n > len(self._free):
            raise ValueError(f"{n} slots asked, {len(self._free)} free in a pool of {self.pool_size}")
        return [heapq.heappop(self._free) for _ in range(n)]

    def give(self, b: int, slots: Sequence[int]) -> None:
        self.slots[b] += [int(slot) for slot in slots]


class PoolSizes:
    """The sizes a pool takes (buckets of `step` slots up to `largest`, capped by a memory
    budget) and what a pool of a size costs in memory.

    `slot_bytes`: a slot's keys and values over every layer; `tensor_bytes`: a slot's in one of
    the pool's tensors (one layer's keys or values); `score_bytes`: what a decode call holds per
    pool slot beside the pool (`call_bytes`)."""

    def __init__(self, step: int, largest: int, slot_bytes: int, tensor_bytes: int, score_bytes: int):
        self.all = cache_buckets(step, largest)
        self.current = self.all  # capped by `cap`
        self.slot_bytes, self.tensor_bytes, self.score_bytes = slot_bytes, tensor_bytes, score_bytes

    @property
    def largest(self) -> int:
        return self.current[-1]

    def pool_bytes(self, pool: int) -> int:
        """The most memory a batch whose pool reaches `pool` slots takes beyond the baseline:

        - the pool, once: the decoder moves the kept slots within its memory, and packing
          them into a smaller pool copies one tensor's at a time;
        - the mask and the attention kernel's scratch (`score_bytes` a slot).
        Nothing in the runtime's arena grows with the pool: the attention reads it in place (the
        batched matmul it replaced had XNNPACK pack a layer's keys at the largest pool, which the
        arena kept). Every term grows with `pool`, so a larger pool never costs less."""
        return self.slot_bytes * pool + self.tensor_bytes * pool + self.score_bytes * (pool + 1)

    def batch_bytes(self, rows: Sequence[GenerationRow]) -> int:
        """The memory of the largest pool a batch holding `rows` reaches (`pool_bytes`).

        The rows at full length fill S = sum(prompt + max_tokens + 1) slots (a row feeds its
        prompt and each new token but the last one, so this counts 2 spare slots a row: the
        call that fills a row's last slot needs it free). The pool grows by `slots_wanted`,
        rounded up to a size and held to the largest; it never needs more than the size holding
        S, so that is its floor (past the capped largest: such rows do not fit, and the bytes
        say so)."""
        if not rows:
            return 0
        filled = sum(len(r.prompt_ids) + r.max_tokens + 1 for r in rows)
        pool = max(self.bucket(filled), min(self.bucket(slots_wanted(filled, len(rows))), self.largest))
        return self.pool_bytes(pool)

    def cap(self, budget: int | None) -> None:
        """Cap the largest size at the largest whose `pool_bytes` fit `budget` (None: no cap):
        no pool or copy can pass it then. A row admitted within the budget fits the capped pool:
        `batch_bytes` of rows that need a larger pool is that pool's bytes, over the budget.
        With no size fitting, the smallest stays (every row is over the budget then)."""
        sizes = self.all
        if budget is not None:
            fitting = [c for c in sizes if self.pool_bytes(c) <= budget]
            sizes = tuple(c for c in sizes if c <= (fitting[-1] if fitting else sizes[0]))
        self.current = sizes

    def bucket(self, slots: int) -> int:
        """The smallest uncapped size holding `slots`, or `slots` itself past them all."""
        return next((c for c in self.all if c >= slots), slots)

    def size_for(self, slots: int) -> int:
        """The smallest size holding `slots` (the largest, if none does)."""
        return next((c for c in self.current if c >= slots), self.current[-1])
