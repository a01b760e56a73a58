"""Continuous batching: rows join and leave the running batch between decode calls.

Modelled on TGI's router (`router/src/infer/v3/scheduler.rs`) and vLLM's scheduler: the
running batch is a value (`DecodeBatch`) that one loop filters and extends between decode
calls, so a request never waits for another's long answer, and a finished row's answer goes
out at once. The knobs keep TF Serving's names (`max_batch_size`, `batch_timeout`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal


from service.detokenize import IncrementalDetokenizer, first_stop
from service.engine import DecodeBatch, Engine, FinishReason, GenerationRow, RowUpdate, TokenLogprob

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.0002  # seconds; see Scheduler.start


class QueueFull(Exception):
    """The bounded queue has no room for all of a request's prompts."""

    def __init__(self, waiting: int, wanted: int, bound: int):
        super().__init__(
            f"server busy: {waiting} prompts are waiting and this request adds {wanted}, "
            f"over the queue bound of {bound}; retry later"
        )


class SchedulerStopped(Exception):
    """The server is shutting down and takes no new work."""


class GenerationFailed(Exception):
    """A decode call raised: every row in that batch gets this error."""


class QueueTimeout(QueueFull, GenerationFailed):
    """A request waited in the queue longer than `max_queue_wait` with none of its rows admitted.

    Answered as a full queue is (503 + Retry-After; /v1: 429); a streamed request, whose status
    has gone out, hears of it as of a failed generation."""

    def __init__(self, waited: float, bound: float):
        Exception.__init__(self, f"server busy: this request waited {waited:.1f} s in the queue, over the "
                                 f"queue-wait bound of {bound:g} s; retry later")


class ShutdownAborted(SchedulerStopped, GenerationFailed):
    """The server stopped before this row finished (a second signal, or the shutdown's grace
    period ended): answered as a stopping server is (503 + Retry-After)."""

    def __init__(self):
        super().__init__("the server shut down before this request finished; retry later")


@dataclass(frozen=True)
class RowEvent:
    """New tokens of prompt `index` of a request, and why it stopped once it has: the engine's
    reasons, or "stop_sequence" when its text reached one of the request's stop strings."""

    index: int
    tokens: list[int]
    finish: FinishReason | Literal["stop_sequence"] | None = None
    logprobs: list[TokenLogprob] | None = None  # with the row's `logprobs` set: see RowUpdate


@dataclass(eq=False)
class _Row:
    """A row's place in the scheduler: its request, its timings, whether its caller left."""

    index: int
    row: GenerationRow
    request: Request
    enqueued: float
    admitted: float | None = None
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)  # made but not yet sent to the request
    logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when the row asked for them
    generated: int = 0
    stop: _StopWatch | None = None

    @property
    def gone(self) -> bool:
        """Nobody wants this row's tokens any more: its client went away."""
        return self.request.cancelled


@dataclass(eq=False)
class Request:
    """One caller's rows: their events arrive on `events` until every row has finished.

    With `stream`, a row's first tokens are sent at once and then once per tick of an
    `interval`-second clock that all streamed requests share (a `RowEvent` with the tokens made
    meanwhile), and when it finishes; without, one
    `RowEvent` per row with all its tokens when it finishes. Each event wakes the event loop,
    which shares the cores (and the GIL) with decoding, so it is not woken per token. A failure
    arrives as a `GenerationFailed`. Made and read on the event loop; the scheduler's thread
    puts events through the loop.

    `cancel()` (the caller went away) drops the rows still waiting, and takes the running ones
    out of the batch at the next decode-call boundary."""

    rows: list[_Row] = field(default_factory=list)
    stream: bool = False
    interval: float = 0.0
    next_send: float = 0.0  # when a streamed request's tokens may next be sent
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


    async def results(self) -> list[list[int]]:
        """Every row's new tokens, in the request's order, once all have finished."""
        outputs: list[list[int]] = [[] for _ in self.rows]
        unfinished = len(self.rows)
        while unfinished:
            event = await self.events.get()
            if isinstance(event, Exception):
                raise event
            outputs[event.index] += event.tokens
            unfinished -= event.finish is not None
        return outputs


@dataclass
class SchedulerStats:
    """Hooks the metrics hang on (service/metrics.py); plain callables keep this module free of
    any metrics library."""

    queue_wait: Callable[[float], None] = lambda seconds: None
    time_to_first_token: Callable[[float], None] = lambda seconds: None
    time_per_output_token: Callable[[float], None] = lambda seconds: None
    batch_size: Callable[[int], None] = lambda rows: None
    rows_cancelled: Callable[[int], None] = lambda rows: None


class Scheduler:
    """Runs every submitted row through the engine's decode batches, one decode call at a time.

    Contract:
    - `submit(rows)` enqueues all of a request's rows or none (`QueueFull` when the waiting rows
      would pass `max_queue_size`; `SchedulerStopped` once stopping) and returns its `Request`.
    - One worker thread drives one batch: before each decode call it drops the rows of cancelled
      requests, admits waiting rows in arrival order up to `max_batch_size` (they are prefilled
      into the batch), and runs the call; after it, each row's new tokens go to its request (on
      the event loop) at once, and finished rows leave the batch. The thread goes straight on to
      the next call: the event loop's work (HTTP, streaming) never sits between two calls.
    - When the batch is empty, the first arrival waits at most `batch_timeout` seconds for
      others to start with it; rows arriving while the batch runs join at the next call.
    - If a decode call raises, every row in that batch gets `GenerationFailed`; the thread starts
      a new batch and goes on serving.
    - With `max_queue_wait` (seconds), a request none of whose rows has been admitted after that
      long leaves the queue whole and gets `QueueTimeout` (checked at each decode-call boundary).
    - `stop(grace)` refuses new rows, lets every admitted and queued row finish within `grace`
      seconds (None: however long they take), then ends; `abort()`, or the end of the grace,
      answers the rows left `ShutdownAborted` at once (running ones at the next boundary).
    """

    def __init__(self, engine: Engine, *, max_batch_size: int, batch_timeout: float, max_queue_size: int,
                 max_queue_wait: float | None = None, stats: SchedulerStats | None = None):
        if max_batch_size < 1 or max_queue_size < 1 or batch_timeout < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, batch_timeout >= 0")
        if max_queue_wait is not None and max_queue_wait <= 0:
            raise ValueError("max_queue_wait must be > 0 (or None: no bound)")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.max_queue_size = max_queue_size
        self.max_queue_wait = max_queue_wait
        self.stats = stats or SchedulerStats()
        self._changed = threading.Condition()  # guards _waiting and _stopping
        self._waiting: deque[_Row] = deque()
        self._stopping = False
        self._aborted = False
        self._running: dict[int, _Row] = {}  # by key in the batch; the worker thread's own
        self._stopped: list[int] = []  # keys of rows ended by a stop string, to leave the batch
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Future | None = None
        self.decode_calls = 0

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        # The decode thread holds the GIL between native calls (sampling, cache bookkeeping) and
        # needs it back after each one; while the event loop runs Python, it waits up to the
        # switch interval. At the default 5 ms, a busy event loop made a 2 ms decode step take
        # 22 ms; at 0.2 ms, 4 ms (sys.setswitchinterval; the setting is process-wide).
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._loop = asyncio.get_running_loop()
        self._ended = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    async def stop(self, grace: float | None = None) -> bool:
        """Refuse new rows and let the admitted and queued ones finish, for at most `grace`
        seconds; then `abort()` the rest. True if every row finished."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._ended is None:
            return True
        done, _ = await asyncio.wait({self._ended}, timeout=grace)
        if not done:
            log.warning("shutdown grace of %g s over: %d running and %d queued prompts get 503",
                        grace, self.running, self.queued)
            self.abort()
        await asyncio.shield(self._ended)
        # The worker resolves `_ended` from its last `finally`; wait for the thread itself to
        # return, so that `alive` is False once stop() is (the thread is a step from its end).
        await asyncio.to_thread(self._thread.join)
        return not self._aborted

    def abort(self) -> None:
        """Stop at once: waiting rows get `ShutdownAborted` now, running ones at the next
        decode-call boundary, and the worker ends. Called on the event loop."""
        with self._changed:
            self._stopping = self._aborted = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._changed.notify()
        if waiting:
            error = ShutdownAborted()
            _put_events([(request, error) for request in dict.fromkeys(r.request for r in waiting)])

    def submit(self, rows: Sequence[GenerationRow], *, stream: bool = False, interval: float = 0.0,
               stops: Sequence[str] = ()) -> Request:
        """Queue a request's rows. With `stops`, a row whose text reaches one of them finishes
        ("stop_sequence") at that decode call and generates nothing more."""
        request = Request(stream=stream, interval=interval)
        now = time.monotonic()
        request.rows = [_Row(i, row, request, now, stop=_StopWatch(self.engine.decode, stops) if stops else None)
                        for i, row in enumerate(rows)]
        with self._changed:
            if self._stopping or not self.alive:
                raise SchedulerStopped("the server is shutting down")
            if len(self._waiting) + len(rows) > self.max_queue_size:
                raise QueueFull(len(self._waiting), len(rows), self.max_queue_size)
            self._waiting.extend(request.rows)
            self._changed.notify()
        return request

    # --- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            batch = self.engine.new_batch()
            while True:
                leaving, joining = self._next_changes()
                if leaving is None:
                    if self._running:  # aborted
                        self._fail(ShutdownAborted())
                    return
                for key in leaving:
                    self._running.pop(key, None)
                entries = [(next(self._keys), r) for r in joining]
                self._running.update(entries)
                if not self._running:
                    continue
                self.stats.batch_size(len(self._running))
                try:
                    self._deliver(_advance(batch, leaving, [(key, r.row) for key, r in entries]))
                except Exception as exc:  # every row of the batch hears of it; serving goes on
                    log.exception("decode call failed with %d rows", len(self._running))
                    self._fail(GenerationFailed(f"generation failed: {exc}"))
                    batch = self.engine.new_batch()
                finally:
                    self.decode_calls += 1
        finally:
            self._on_loop(self._ended.set_result, None)

    def _next_changes(self) -> tuple[list | None, list[_Row]]:
        """The running rows to drop (their clients left) and the waiting rows to admit, once
        there is work; (None, []) once stopping with none left, or aborted."""
        with self._changed:
            if self._aborted:
                return None, []
            if not self._running:
                while not self._waiting_live() and not self._stopping:
                    self._changed.wait()
                if not self._waiting:
                    return None, []
                deadline = time.monotonic() + self.batch_timeout
                while len(self._waiting) < self.max_batch_size and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
            leaving = [key for key, r in self._running.items() if r.gone] + self._stopped
            self._stopped = []
            room = self.max_batch_size - len(self._running) + len(leaving)
            joining = []
            now = time.monotonic()
            while self._waiting and len(joining) < room:
                r = self._waiting.popleft()
                if r.gone:
                    self._dropped(r)
                    continue
                r.admitted = now
                self.stats.queue_wait(now - r.enqueued)
                joining.append(r)
            expired = self._expired(now) if self.max_queue_wait is not None else []
        if expired:
            self._on_loop(_put_events, [(request, QueueTimeout(now - request.rows[0].enqueued, self.max_queue_wait))
                                        for request in expired])
        for key in leaving:
            if key in self._running:
                self._dropped(self._running[key])
        return leaving, joining

    def _expired(self, now: float) -> list[Request]:
        """Take out of the queue, whole, the requests that have waited past `max_queue_wait`
        with none of their rows admitted (a request's rows are queued together, in arrival
        order; only the first in the queue can have rows running already)."""
        expired = []
        i = 0
        if self._waiting and any(r.admitted is not None for r in self._waiting[0].request.rows):
            being_served = self._waiting[0].request
            while i < len(self._waiting) and self._waiting[i].request is being_served:
                i += 1
        while i < len(self._waiting) and now - self._waiting[i].enqueued > self.max_queue_wait:
            request = self._waiting[i].request
            del self._waiting[i]
            while i < len(self._waiting) and self._waiting[i].request is request:
                del self._waiting[i]
            request.cancelled = True  # nothing of it runs now
            expired.append(request)
        return expired

    def _dropped(self, r: _Row) -> None:
        self.stats.rows_cancelled(1)

    def _waiting_live(self) -> bool:
        """Whether a waiting row's client is still there (the others are dropped, and counted)."""
        while self._waiting and self._waiting[0].gone:
            self._dropped(self._waiting.popleft())
        return bool(self._waiting)

    def _deliver(self, updates: list[RowUpdate]) -> None:
        now = time.monotonic()
        events = []
        for update in updates:
            r = self._running[update.key]
            if update.tokens and r.first_token is None:
                r.first_token = now
                self.stats.time_to_first_token(now - r.enqueued)
            r.generated += len(update.tokens)
            finish = update.finish
            if finish is None and r.stop is not None and r.stop.reached(update.tokens):
                finish = "stop_sequence"
                self._stopped.append(update.key)  # it leaves the batch before the next call
            if finish is not None:
                del self._running[update.key]
                if r.generated > 1:
                    self.stats.time_per_output_token((now - r.first_token) / (r.generated - 1))
            r.tokens += update.tokens
            if update.logprobs:
                r.logprobs += update.logprobs
            request = r.request
            due = request.stream and r.tokens and now >= request.next_send
            if due or finish is not None:
                logprobs = r.logprobs if r.row.logprobs is not None else None
                events.append((request, RowEvent(r.index, r.tokens, finish, logprobs)))
                r.tokens, r.logprobs = [], []
        for request, _ in events:
            if request.stream and now >= request.next_send:
                request.next_send = _next_tick(now, request.interval)
        if events:
            self._on_loop(_put_events, events)

    def _fail(self, error: GenerationFailed) -> None:
        self._on_loop(_put_events, [(r.request, error) for r in self._running.values()])
        self._running.clear()

    def _on_loop(self, callback, *args) -> None:
        """Run `callback(*args)` on the event loop (asyncio objects belong to it)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


class _StopWatch:
    """A row's text as it is made, watched for stop strings (matched across token boundaries)."""

    def __init__(self, decode, stops: Sequence[str]):
        self._text = IncrementalDetokenizer(decode)
        self._stops = list(stops)
        self._hold = max(len(stop) for stop in stops) - 1
        self.text = ""

    def reached(self, tokens: Sequence[int]) -> bool:
        start = max(0, len(self.text) - self._hold)
        self.text += self._text.add(tokens)
        return first_stop(self.text, self._stops, start) is not None


def _next_tick(now: float, interval: float) -> float:
    """When a streamed request that was just written may be written again: the next tick of a
    clock shared by every request with that interval, so that streams that are due together are
    written after the same decode call, with one wake-up of the event loop, rather than each at
    its own phase (8 streams with uneven arrivals: 438 wake-ups where their own phases made 729)."""
    return now if interval <= 0 else (math.floor(now / interval) + 1) * interval


def _put_events(events: list) -> None:
    for request, event in events:
        request.events.put_nowait(event)


def _advance(batch: DecodeBatch, leaving: list, joining: list) -> list[RowUpdate]:
    """One decode-call boundary and call: cancelled rows leave, waiting rows are prefilled in,
    the batch decodes, and finished rows leave."""
    if leaving:
        gone = set(leaving)
        batch.filter([key for key in batch.keys if key not in gone])
    batch.extend(joining)
    return batch.advance()
