"""Pools prompts from concurrent requests into batches for one worker thread.

Modelled on Ray Serve's `serve/batching.py`; the names of the knobs follow TF Serving's
batching (`max_batch_size`, `batch_timeout`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The bounded queue has no room for all of a request's prompts."""

    def __init__(self, waiting: int, wanted: int, bound: int):
        super().__init__(
            f"server busy: {waiting} prompts are waiting and this request adds {wanted}, "
            f"over the queue bound of {bound}; retry later"
        )


class BatcherStopped(Exception):
    """The server is shutting down and takes no new work."""


class BatchFailed(Exception):
    """The batch function raised, or returned the wrong number of results."""


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future = field(repr=False)


class Batcher(Generic[T, R]):
    """Runs `process(items) -> results` on batches of items submitted by concurrent callers.

    Contract:
    - `submit(items)` enqueues all of a caller's items or none (`QueueFull` when the queue of
      waiting items would pass `max_queue_size`), and returns their results in order.
    - One background task takes the oldest waiting item, waits at most `batch_timeout` seconds
      for up to `max_batch_size` items, and runs `process` on them in a worker thread, so the
      event loop keeps serving. A caller's items may be split across batches.
    - `process` returns one result per item, in order. If it raises, or returns a list of the
      wrong length, `BatchFailed` is set on every future of that batch, and batching goes on.
    - Items whose caller went away (cancelled futures) are dropped before they cost work.
    - `stop()` refuses new items (`BatcherStopped`), lets every queued item finish, then ends.
    """

    def __init__(self, process: Callable[[list[T]], Sequence[R]], *, max_batch_size: int,
                 batch_timeout: float, max_queue_size: int):
        if max_batch_size < 1 or max_queue_size < 1 or batch_timeout < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, batch_timeout >= 0")
        self._process = process
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.max_queue_size = max_queue_size
        self._pending: deque[_Pending[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self.batches_run = 0

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        self._stopping = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    async def submit(self, items: Sequence[T]) -> list[R]:
        if self._stopping or not self.alive:
            raise BatcherStopped("the server is shutting down")
        if len(self._pending) + len(items) > self.max_queue_size:
            raise QueueFull(len(self._pending), len(items), self.max_queue_size)
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future()) for item in items]
        self._pending.extend(pending)
        self._arrived.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _run(self) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._run_batch(batch)

    async def _next_batch(self) -> list[_Pending[T, R]] | None:
        """The next batch, or None once stopping with nothing left to do."""
        while True:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()  # its caller is gone
            if self._pending:
                break
            if self._stopping:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + self.batch_timeout
        while len(self._pending) < self.max_batch_size and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self._pending and len(batch) < self.max_batch_size:
            pending = self._pending.popleft()
            if not pending.future.done():
                batch.append(pending)
        return batch

    async def _run_batch(self, batch: list[_Pending[T, R]]) -> None:
        if not batch:
            return
        items = [p.item for p in batch]
        try:
            results = await anyio.to_thread.run_sync(self._process, items)
            if len(results) != len(items):
                raise BatchFailed(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # every caller of the batch hears of it; batching goes on
            log.exception("batch of %d failed", len(items))
            error = exc if isinstance(exc, BatchFailed) else BatchFailed(f"generation failed: {exc}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        finally:
            self.batches_run += 1
        for p, result in zip(batch, results):
            if not p.future.done():
                p.future.set_result(result)
