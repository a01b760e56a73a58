"""Continuous batching: rows join and leave the running batch between decode calls.

Modelled on TGI's router (`router/src/infer/v3/scheduler.rs`) and vLLM's scheduler: the
running batch is a value (`DecodeBatch`) that one loop filters and extends between decode
calls, so a request never waits for another's long answer, and a finished row's answer goes
out at once. The knobs keep TF Serving's names (`max_batch_size`, `batch_timeout`).
"""

from __future__ import annotations

import asyncio
import enum
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
    """A decode call raised (every request with a row in that batch gets this error), or one
    row's own work did (its request alone gets it)."""


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


class RowState(enum.Enum):
    """Where a row is in its life (vLLM's `SequenceStatus`): WAITING -> RUNNING -> one of the
    ends. A row leaves the queue or the batch in the same transition that gives it its end."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # end-of-text or max_tokens
    STOPPED = "stopped"  # its text reached a stop string
    GONE = "gone"  # its client went away
    EXPIRED = "expired"  # it waited past max_queue_wait
    FAILED = "failed"  # its decode call, its own sampling or stop watch raised, or shutdown ended it


@dataclass(eq=False)
class _Row:
    """A row's place in the scheduler: its request, its state, its key in the batch while it
    runs, and its timings."""

    index: int
    row: GenerationRow
    request: Request
    enqueued: float
    state: RowState = RowState.WAITING
    key: int | None = None
    admitted: float | None = None
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)  # made but not yet sent to the request
    logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when the row asked for them
    generated: int = 0
    stop: _StopWatch | None = None

    def take(self, update: RowUpdate) -> FinishReason | Literal["stop_sequence"] | None:
        """A decode call's new tokens; why the row ends, if it does (its own failure raises)."""
        if update.error is not None:
            raise update.error
        tokens, logprobs, finish = update.tokens, update.logprobs or [], update.finish
        upto = self.stop.reached(tokens) if self.stop is not None else None
        if upto is not None:  # what a call made past the stop string is not the row's (tf makes several)
            tokens, logprobs, finish = tokens[:upto], logprobs[:upto], "stop_sequence"
        self.generated += len(tokens)
        self.tokens += tokens
        self.logprobs += logprobs
        return finish

    def event(self, finish: FinishReason | Literal["stop_sequence"] | None) -> RowEvent:
        """The tokens made since the last event, as the next one."""
        event = RowEvent(self.index, self.tokens, finish, self.logprobs if self.row.logprobs is not None else None)
        self.tokens, self.logprobs = [], []
        return event


@dataclass(eq=False)
class Request:
    """One caller's rows: their events arrive on `events` until every row has finished.

    With `stream`, a row's first tokens are sent at once and then once per tick of an
    `interval`-second clock that all streamed requests share (a `RowEvent` with the tokens made
    meanwhile), and when it finishes; without, one
    `RowEvent` per row with all its tokens when it finishes. Each event wakes the event loop,
    which shares the cores (and the GIL) with decoding, so it is not woken per token. A failure
    arrives as one exception (`GenerationFailed` or a subclass), and nothing after it. Made and
    read on the event loop; the scheduler's thread puts events through the loop.

    `cancel()` (the caller went away) drops the rows still waiting, and takes the running ones
    out of the batch at the next decode-call boundary."""

    rows: list[_Row] = field(default_factory=list)
    stream: bool = False
    interval: float = 0.0
    next_send: float = 0.0  # when a streamed request's tokens may next be sent
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    failed: Exception | None = None  # set once, by the scheduler, with the one failure it sends

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
    - Each row is in one `RowState`, changed in one place per transition (`_admit`, `_end`).
      The running rows are exactly the engine batch's rows after every decode call.
    - One worker thread drives one batch through `step()`: at each decode-call boundary the rows
      of cancelled requests leave (GONE), requests waiting past `max_queue_wait` with none of
      their rows admitted leave the queue whole and get `QueueTimeout` (EXPIRED), and waiting
      rows join in arrival order while the batch has fewer than `max_batch_size` rows and the
      engine's `batch_bytes` of the batch with them stays within its `memory_budget` (a row that
      does not fit waits, and the rows behind it too). Then one decode call; each row's new
      tokens go to its request (on the event loop) at once, and rows that ended leave the batch.
      The thread goes straight on to the next call: the event loop's work never sits between two.
    - When the batch is empty, the first arrival waits at most `batch_timeout` seconds for
      others to start with it; rows arriving while the batch runs join at the next call.
    - A failure that belongs to one row (a `RowUpdate` with an error: its sampling; its stop
      watch) fails that row's request alone. A decode call that raises fails the requests of
      that batch's rows (`GenerationFailed`), and the next rows start on a new batch; the
      waiting rows are untouched. A request gets one outcome: its rows' final events, or one
      exception.
    - `call(fn, *args)` runs `fn` on the worker thread between two decode calls (engine work
      that must not run beside the batch, e.g. scoring a prompt).
    - `stop(grace)` refuses new rows, lets every admitted and queued row finish within `grace`
      seconds (None: however long they take), then ends; `abort()`, or the end of the grace,
      answers the rows left `ShutdownAborted` at once (running ones at the next boundary).
    - Tests drive it without the thread: `attach(loop)`, then `step()` until it returns False.
    """

    def __init__(self, engine: Engine, *, max_batch_size: int, batch_timeout: float, max_queue_size: int,
                 max_queue_wait: float | None = None, stats: SchedulerStats | None = None,
                 clock: Callable[[], float] = time.monotonic):
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
        self._clock = clock
        self._changed = threading.Condition()  # guards _waiting, _jobs, _stopping, _aborted and row ends
        self._waiting: deque[_Row] = deque()
        self._jobs: deque[tuple[Callable, tuple, asyncio.Future]] = deque()
        self._stopping = False
        self._aborted = False
        self._running: dict[int, _Row] = {}  # the RUNNING rows by key; the worker thread's own
        self._batch: DecodeBatch | None = None
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Future | None = None
        self.decode_calls = 0
        self.admitted_bytes = 0  # engine.batch_bytes of the running rows: what admission has reserved

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def running_keys(self) -> frozenset[int]:
        return frozenset(self._running)

    @property
    def batch_keys(self) -> frozenset:
        return frozenset(self._batch.keys) if self._batch is not None else frozenset()

    @property
    def alive(self) -> bool:
        if self._thread is None:  # attached (tests), or not started
            return self._loop is not None and not self._aborted
        return self._thread.is_alive()

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

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve without a worker thread: the caller runs `step()` (tests)."""
        self._loop = loop

    def request_stop(self) -> None:
        """Refuse new rows from now on; the admitted and queued ones go on."""
        with self._changed:
            self._stopping = True
            self._changed.notify()

    async def stop(self, grace: float | None = None) -> bool:
        """Refuse new rows and let the admitted and queued ones finish, for at most `grace`
        seconds; then `abort()` the rest. True if every row finished."""
        self.request_stop()
        if self._thread is None:
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
        """Stop at once: every row left gets `ShutdownAborted` at the next decode-call boundary
        (at once when none runs), and the worker ends."""
        with self._changed:
            self._stopping = self._aborted = True
            self._changed.notify()

    def submit(self, rows: Sequence[GenerationRow], *, stream: bool = False, interval: float = 0.0,
               stops: Sequence[str] = ()) -> Request:
        """Queue a request's rows. With `stops`, a row whose text reaches one of them finishes
        ("stop_sequence") at that decode call and generates nothing more."""
        request = Request(stream=stream, interval=interval)
        now = self._clock()
        request.rows = [_Row(i, row, request, now, stop=_StopWatch(self.engine, stops) if stops else None)
                        for i, row in enumerate(rows)]
        with self._changed:
            if self._stopping or not self.alive:
                raise SchedulerStopped("the server is shutting down")
            if len(self._waiting) + len(rows) > self.max_queue_size:
                raise QueueFull(len(self._waiting), len(rows), self.max_queue_size)
            self._waiting.extend(request.rows)
            self._changed.notify()
        return request

    def call(self, fn: Callable, *args) -> asyncio.Future:
        """`fn(*args)` run on the worker thread between two decode calls; awaited on the loop."""
        future = asyncio.get_running_loop().create_future()
        with self._changed:
            if self._stopping or not self.alive:
                raise SchedulerStopped("the server is shutting down")
            self._jobs.append((fn, args, future))
            self._changed.notify()
        return future

    # --- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self.step()
        finally:
            self._end_all(ShutdownAborted())
            self._on_loop(self._ended.set_result, None)

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once stopping with nothing left, or aborted.
        An empty batch's first arrival waits up to `batch_timeout` for others."""
        with self._changed:
            if self._running or self._jobs:
                return not self._aborted
            while not self._aborted and not self._jobs and not self._waiting_live() and not self._stopping:
                self._changed.wait()
            if self._aborted or (not self._waiting and not self._jobs):
                return False
            deadline = time.monotonic() + self.batch_timeout
            while len(self._waiting) < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return True

    def step(self) -> bool:
        """One decode-call boundary and at most one decode call; False when there was nothing to
        do (nothing runs, nothing waits that may join, no job)."""
        with self._changed:
            jobs, self._jobs = list(self._jobs), deque()
        for fn, args, future in jobs:
            self._run_job(fn, args, future)
        if self._aborted:
            return self._end_all(ShutdownAborted()) or bool(jobs)
        for r in [r for r in self._running.values() if r.request.cancelled]:
            self._end(r, RowState.GONE)
        with self._changed:
            now = self._clock()
            if self.max_queue_wait is not None:
                self._expire(now)
            joining = self._admit(now)
        if not self._running:
            self._sync_batch()
            return bool(jobs or joining)
        self._decode(joining)
        return True

    def _admit(self, now: float) -> list[_Row]:
        """WAITING -> RUNNING, in arrival order, while the batch has room and the memory budget
        holds the batch with the row (held by the caller: `_changed`)."""
        joining = []
        while self._waiting_live() and len(self._running) < self.max_batch_size:
            r = self._waiting[0]
            if not self._fits(r):
                if not self._running:  # it could never run: its request fails, not the queue
                    self._fail(r.request, GenerationFailed(f"generation failed: prompt {r.index} needs more memory "
                                                           "than this server's budget for generation"))
                    continue
                break
            self._waiting.popleft()
            r.state, r.key, r.admitted = RowState.RUNNING, next(self._keys), now
            self._running[r.key] = r
            self.stats.queue_wait(now - r.enqueued)
            joining.append(r)
        if joining:
            self._reserve()
        return joining

    def _fits(self, r: _Row) -> bool:
        budget = self.engine.memory_budget
        return budget is None or self.engine.batch_bytes([*(x.row for x in self._running.values()), r.row]) <= budget

    def _reserve(self) -> None:
        """What admission holds now: the running rows' worst case (`admitted_bytes`)."""
        self.admitted_bytes = self.engine.batch_bytes([r.row for r in self._running.values()]) if self._running else 0

    def _end(self, r: _Row, state: RowState) -> None:
        """A row's end: it leaves the queue or the batch, in `state` (one of the ends)."""
        if r.state is RowState.RUNNING:
            del self._running[r.key]
            self._reserve()
        elif r.state is RowState.WAITING:
            with self._changed:
                self._waiting.remove(r)
        else:
            return
        r.state = state
        if state is RowState.GONE:
            self.stats.rows_cancelled(1)

    def _fail(self, request: Request, error: Exception, state: RowState = RowState.FAILED) -> None:
        """The request's one outcome is `error`: its rows still waiting or running end in `state`."""
        with self._changed:
            if request.failed is not None:
                return
            request.failed = error
            for r in request.rows:
                self._end(r, state)
        self._on_loop(request.events.put_nowait, error)

    def _end_all(self, error: Exception) -> bool:
        """Every row running or waiting fails with `error` (shutdown); whether there were any."""
        with self._changed:
            requests = dict.fromkeys(r.request for r in [*self._running.values(), *self._waiting])
            for request in requests:
                self._fail(request, error)
            jobs, self._jobs = list(self._jobs), deque()
        for _, _, future in jobs:
            self._on_loop(_settle, future, None, error)
        if self._batch is not None:
            self._sync_batch()
        return bool(requests or jobs)

    def _expire(self, now: float) -> None:
        """EXPIRED: the requests that have waited past `max_queue_wait` with none of their rows
        admitted leave the queue whole (a request's rows are queued together, in arrival order;
        only the first in the queue can have rows running already)."""
        for r in list(self._waiting):
            if now - r.enqueued <= self.max_queue_wait:
                break
            request = r.request
            if request.cancelled:
                self._end(r, RowState.GONE)
            elif all(x.state is RowState.WAITING for x in request.rows):
                self._fail(request, QueueTimeout(now - r.enqueued, self.max_queue_wait), RowState.EXPIRED)

    def _waiting_live(self) -> bool:
        """Whether a waiting row's client is still there (the others end GONE)."""
        while self._waiting and self._waiting[0].request.cancelled:
            self._end(self._waiting[0], RowState.GONE)
        return bool(self._waiting)

    def _decode(self, joining: list[_Row]) -> None:
        """The joining rows enter the batch, one decode call, its tokens delivered, and the rows
        that ended leave the batch. If the engine raises, the batch's rows fail and a new batch
        takes the next rows."""
        try:
            self._sync_batch(joining)
            self._batch.extend([(r.key, r.row) for r in joining])
            self.stats.batch_size(len(self._running))
            updates = self._batch.step()
            self.decode_calls += 1
            self._deliver(updates)
            self._sync_batch()
        except Exception as exc:
            log.exception("decode call failed with %d rows", len(self._running))
            error = GenerationFailed(f"generation failed: {exc}")
            for r in list(self._running.values()):
                self._fail(r.request, error)
            failed, self._batch = self._batch, None  # the next rows start on a new batch
            try:  # and this one gives its slots back, so the pool's gauges return to idle
                failed.filter([])
            except Exception:
                log.exception("emptying the failed batch failed too")

    def _sync_batch(self, joining: Sequence[_Row] = ()) -> None:
        """The batch holds the running rows (less `joining`, which enter next): the rows that
        ended leave it."""
        if self._batch is None:
            self._batch = self.engine.new_batch()
        keep = self._running.keys() - {r.key for r in joining}
        keys = self._batch.keys
        if len(keys) != len(keep) or not keep.issuperset(keys):
            self._batch.filter([key for key in keys if key in keep])

    def _deliver(self, updates: list[RowUpdate]) -> None:
        now = self._clock()
        events = []
        rows = dict(self._running)  # a row failed below may take its request's other rows out
        if any(update.key not in rows for update in updates):  # before any row is answered
            raise RuntimeError(f"the batch returned rows it does not hold ({[u.key for u in updates]!r})")
        for update in updates:
            r = rows[update.key]
            if r.state is not RowState.RUNNING:
                continue
            try:
                finish = r.take(update)
            except Exception as exc:  # the row's own failure: its request alone hears of it
                log.exception("row %d of a request failed", r.index)
                self._fail(r.request, GenerationFailed(f"generation failed: {exc}"))
                continue
            if update.tokens and r.first_token is None:
                r.first_token = now
                self.stats.time_to_first_token(now - r.enqueued)
            if finish is not None:
                self._end(r, RowState.STOPPED if finish == "stop_sequence" else RowState.FINISHED)
                if r.generated > 1:
                    self.stats.time_per_output_token((now - r.first_token) / (r.generated - 1))
            # A streamed row's first tokens go at once, even when its request's tick is not due.
            first = len(r.tokens) == r.generated
            if finish is not None or (r.request.stream and r.tokens and (first or now >= r.request.next_send)):
                events.append((r.request, r.event(finish)))
        # A request failed by one of its rows hears nothing after that (its other rows' tokens
        # of this call included).
        events = [(request, event) for request, event in events if request.failed is None]
        for request, _ in events:
            if request.stream and now >= request.next_send:
                request.next_send = _next_tick(now, request.interval)
        if events:
            self._on_loop(_put_events, events)

    def _run_job(self, fn: Callable, args: tuple, future: asyncio.Future) -> None:
        try:
            result = fn(*args)
        except Exception as exc:
            self._on_loop(_settle, future, None, exc)
        else:
            self._on_loop(_settle, future, result, None)

    def _on_loop(self, callback, *args) -> None:
        """Run `callback(*args)` on the event loop (asyncio objects belong to it)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


class _StopWatch:
    """A row's text as it is made, watched for stop strings (matched across token boundaries)."""

    def __init__(self, engine, stops: Sequence[str]):
        self._text = IncrementalDetokenizer(engine.decode, engine.byte_fallback_ids)
        self._stops = list(stops)
        self._hold = max(len(stop) for stop in stops) - 1
        self.text = ""

    def reached(self, tokens: Sequence[int]) -> int | None:
        """How many of `tokens` the text took to reach a stop string; None: it has not."""
        for i, token in enumerate(tokens):
            start = max(0, len(self.text) - self._hold)
            self.text += self._text.add([token])
            if first_stop(self.text, self._stops, start) is not None:
                return i + 1
        return None


def _next_tick(now: float, interval: float) -> float:
    """When a streamed request that was just written may be written again: the next tick of a
    clock shared by every request with that interval, so that streams that are due together are
    written after the same decode call, with one wake-up of the event loop, rather than each at
    its own phase (8 streams with uneven arrivals: 438 wake-ups where their own phases made 729)."""
    return now if interval <= 0 else (math.floor(now / interval) + 1) * interval


def _put_events(events: list) -> None:
    for request, event in events:
        request.events.put_nowait(event)


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.done():  # its caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
