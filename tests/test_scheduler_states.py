"""The real scheduler and the tiny model, driven by hypothesis's stateful testing.

A `RuleBasedStateMachine` submits requests (greedy and seeded rows, duplicates, streams, stop
strings), steps the scheduler by hand (`attach` + `step`, no worker thread), lets clients leave
at any moment, moves a fake clock past the queue-wait bound, fills the queue, stops or aborts,
and (in the faulty variant) makes decode calls raise or single rows fail. After every rule it
checks what the scheduler says against what the engine's batch saw; at the end it drains the
scheduler and holds every answered row to the same row run alone (`engine.generate([row])`).

Bounded for CI; `SCHEDULER_STATES_EXAMPLES` / `SCHEDULER_STATES_STEPS` make a longer run, e.g.
`SCHEDULER_STATES_EXAMPLES=300 pytest tests/test_scheduler_states.py --hypothesis-seed=7`.
"""

from __future__ import annotations

import asyncio
import collections
import time
import os
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant, multiple, precondition, rule,
                                 run_state_machine_as_test)

from fakes import RecordingEngine
from service.detokenize import IncrementalDetokenizer, first_stop
from service.engine import GenerationRow
from service.scheduler import (GenerationFailed, QueueFull, QueueTimeout, RowEvent, Scheduler, SchedulerStopped,
                               ShutdownAborted)

MAX_BATCH = 4  # ENGINE_OPTIONS' max_batch_size
MAX_QUEUE = 12
QUEUE_WAIT = 10.5  # fake seconds; the clock moves in whole seconds, so no request waits exactly this long
VOCAB = [0, 1, 2, 13, 198, 200, 201, 202, 250, 256, 300, 301, 400, 510, 511]  # 511: end-of-text
# What the tiny model writes often (single characters) and now and then (words).
STOPS = [" ", "e", "s", "=", "\n", "A", " is", "def", "other", "value", "sult"]

SETTINGS = settings(
    max_examples=int(os.environ.get("SCHEDULER_STATES_EXAMPLES", "40")),
    stateful_step_count=int(os.environ.get("SCHEDULER_STATES_STEPS", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

SEEN: collections.Counter = collections.Counter()  # what the runs did, printed with -s


def event(what: str) -> None:
    try:
        _event(what)
    except InvalidArgument:  # the found sequences, replayed as plain tests, are outside hypothesis
        pass
    SEEN[what] += 1


_solo: dict[tuple[str, GenerationRow], list[int]] = {}  # (backend, row) -> its tokens run alone


def solo(engine, row: GenerationRow) -> list[int]:
    """The row run alone. On LiteRT this uses the decoder the scheduler's batch uses: call it only
    while that batch is empty."""
    key = (engine.backend, row)
    if key not in _solo:
        started = time.perf_counter()
        _solo[key] = engine.generate([row])[0]
        SEEN["seconds alone"] += time.perf_counter() - started
    return _solo[key]


def stop_call(decode, stops, calls: list[list[int]]) -> int | None:
    """The first decode call after which the row's text (as it is made, a call at a time)
    contains one of `stops`; None if none does."""
    if not stops:
        return None
    text, detok, hold = "", IncrementalDetokenizer(decode), max(len(s) for s in stops) - 1
    for j, tokens in enumerate(calls):
        start = max(0, len(text) - hold)
        text += detok.add(tokens)
        if first_stop(text, stops, start) is not None:
            return j
    return None


def near_tie_flip(row: GenerationRow, made: list[int], alone: list[int]) -> int | None:
    """Where a sampled row's tokens first part from its solo run's, if they part as a draw at
    the edge between two tokens does: onto the token next to it in the vocabulary's order (the
    order the inverse CDF is searched in). A row's logits beside other rows differ from its
    logits alone in the last bits, so such a draw can take either (RULES.md). None: no such
    parting (the tokens agree, or the row is greedy, or they part otherwise: a real mismatch)."""
    if row.temperature == 0:
        return None
    at = next((j for j, (a, b) in enumerate(zip(made, alone)) if a != b), None)
    return at if at is not None and abs(made[at] - alone[at]) == 1 else None


def stop_token(decode, stops, tokens: list[int]) -> int | None:
    """How many of `tokens` the row's text takes, a token at a time, to contain one of `stops`
    (a stopped row keeps those; a call may have made more)."""
    at = stop_call(decode, stops, [[t] for t in tokens])
    return None if at is None else at + 1


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- what is submitted ---------------------------------------------------------------------------

max_tokens = st.one_of(st.integers(1, 4), st.integers(1, 24), st.integers(25, 120), st.integers(121, 600))


@st.composite
def rows(draw) -> GenerationRow:
    if draw(st.integers(0, 5)) == 0:
        # Seed 3, stream 0 draws end-of-text at the 7th token after many one-token prompts:
        # the tiny model's greedy rows never end so.
        return GenerationRow((draw(st.sampled_from(VOCAB)),), draw(st.integers(4, 40)),
                             temperature=draw(st.sampled_from([0.5, 1.0])), seed=3)
    prompt = tuple(draw(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=40)))
    sampled = draw(st.booleans())
    return GenerationRow(prompt, draw(max_tokens),
                         temperature=draw(st.sampled_from([0.5, 1.0, 1.5])) if sampled else 0.0,
                         seed=draw(st.integers(0, 3)) if sampled else 0)


@st.composite
def duplicates(draw) -> list[GenerationRow]:
    """`n` answers to one prompt: the same row with streams 0..n-1."""
    row = draw(rows())
    return [replace(row, stream=i) for i in range(draw(st.integers(2, 5)))]


row_lists = st.one_of(st.lists(rows(), min_size=1, max_size=3), st.lists(rows(), min_size=1, max_size=3), duplicates(),
                      st.lists(rows(), min_size=1, max_size=32))
stop_lists = st.one_of(st.just(()), st.lists(st.sampled_from(STOPS), min_size=1, max_size=3, unique=True).map(tuple))


# --- what happened to each request ---------------------------------------------------------------

@dataclass(eq=False)
class Tracked:
    """A submitted request, what it was asked, and every event it got."""

    request: object
    rows: list[GenerationRow]
    stops: tuple[str, ...]
    stream: bool
    submitted: float
    seqs: list[int]  # arrival order of each row, across requests
    tokens: list[list[int]] = field(default_factory=list)  # delivered, per row
    finish: list = field(default_factory=list)
    error: Exception | None = None
    cancelled_at: tuple[int, int] | None = None  # (decode calls, extends) made when the client left
    faulted: bool = False  # a fault was injected into a call or an update of one of its rows
    expect_expiry: bool = False
    expect_abort: bool = False
    calls: list[list[list[int]]] = field(default_factory=list)  # per row, the tokens of each decode call
    events: list[list[RowEvent]] = field(default_factory=list)  # per row
    interval: float = 0.0
    violations: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.tokens = [[] for _ in self.rows]
        self.finish = [None] * len(self.rows)
        self.calls = [[] for _ in self.rows]
        self.events = [[] for _ in self.rows]

    @property
    def answered(self) -> bool:
        return self.error is not None or all(f is not None for f in self.finish)

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None

    def receive(self, event) -> None:
        if self.answered:
            self.violations.append(f"event after the outcome: {event!r}")
            return
        if isinstance(event, Exception):
            self.error = event
            return
        assert isinstance(event, RowEvent), event
        i = event.index
        if self.finish[i] is not None:
            self.violations.append(f"row {i}: event after its final one: {event!r}")
        if not self.stream and event.finish is None:
            self.violations.append(f"row {i}: an unstreamed request got a non-final event {event!r}")
        self.tokens[i] += event.tokens
        self.finish[i] = event.finish
        self.events[i].append(event)

    def states(self) -> list[str]:
        return [r.state.name for r in self.request.rows]

    def __repr__(self):
        return f"<request rows={len(self.rows)} seqs={self.seqs[0]}..>"


class SchedulerMachine(RuleBasedStateMachine):
    """The real scheduler, stepped by hand; `engine` is set by the test."""

    engine = None  # the real engine
    budget = None  # slots (RecordingEngine's made-up measure); None: admission by count alone

    requests = Bundle("requests")

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.rec = RecordingEngine(self.engine, budget=self.budget)
        self.scheduler = Scheduler(self.rec, max_batch_size=MAX_BATCH, batch_timeout=0, max_queue_size=MAX_QUEUE,
                                   max_queue_wait=QUEUE_WAIT, clock=self.clock)
        self.scheduler.attach(self.loop)
        self.tracked: list[Tracked] = []
        self.by_row: dict[int, tuple[Tracked, int]] = {}  # id(GenerationRow) -> its request and index
        self.by_key: dict = {}  # batch key -> (Tracked, index)
        self.seen = dict(extends=0, updates=0, raised=0, errored=0)
        self.seq = 0
        self.stopping = self.aborted = False
        self.violations: list[str] = []

    # --- plumbing ----------------------------------------------------------------------------------

    def pump(self) -> None:
        """Run the loop's callbacks (the scheduler's events), then read every request's events."""
        for _ in range(2):
            self.loop.run_until_complete(asyncio.sleep(0))
        for t in self.tracked:
            while True:
                try:
                    event = t.request.events.get_nowait()
                except asyncio.QueueEmpty:
                    break
                t.receive(event)

    def note_engine(self) -> list[tuple[Tracked, int]]:
        """Read what the batch saw since the last time; returns the rows extended meanwhile."""
        rec, seen = self.rec, self.seen
        joined = []
        for entries in rec.extends[seen["extends"]:]:
            for key, row in entries:
                assert id(row) in self.by_row, f"extended with a row nobody submitted: {row}"
                assert key not in self.by_key, f"key {key} reused"
                self.by_key[key] = self.by_row[id(row)]
                joined.append(self.by_row[id(row)])
        for updates in rec.updates[seen["updates"]:]:
            for u in updates:
                t, i = self.by_key[u.key]
                t.calls[i].append(list(u.tokens))
        for keys in rec.raised[seen["raised"]:]:
            for key in keys:
                self.by_key[key][0].faulted = True
        for key in rec.errored[seen["errored"]:]:
            self.by_key[key][0].faulted = True
        seen.update(extends=len(rec.extends), updates=len(rec.updates), raised=len(rec.raised),
                    errored=len(rec.errored))
        return joined

    def live_waiting(self) -> list[tuple[Tracked, int]]:
        return [(t, i) for t in self.tracked if not t.cancelled and t.error is None
                for i, s in enumerate(t.states()) if s == "WAITING"]

    def one_step(self, cancel: Tracked | None = None) -> bool:
        """One `step()`, checked: expiry as predicted, admission in arrival order up to a full batch."""
        rec = self.rec
        now = self.clock()
        expiring = [] if self.aborted else [
            t for t in self.tracked
            if not t.cancelled and not t.answered and all(s == "WAITING" for s in t.states())
            and now - t.submitted > QUEUE_WAIT]
        calls_before, extends_before, raised_before = len(rec.calls), len(rec.extends), len(rec.raised)
        started = time.perf_counter()
        did = self.scheduler.step()
        SEEN["seconds in step()"] += time.perf_counter() - started
        waiting = self.live_waiting()  # as the step left them, before a client leaves below
        if cancel is not None:  # the client leaves while the call's answer is on its way
            self.cancel_now(cancel)
        self.pump()
        joined = self.note_engine()
        calls = rec.calls[calls_before:]
        assert len(calls) <= 1, f"one step made {len(calls)} decode calls"
        for t in expiring:
            t.expect_expiry = True
            assert set(t.states()) == {"EXPIRED"}, f"{t} waited past the bound: {t.states()}"
        for t in self.tracked:
            if isinstance(t.error, QueueTimeout):
                assert t.expect_expiry, f"{t} timed out, but it was not due"
        if not did:
            assert not calls and len(rec.extends) == extends_before, "step() said idle but worked"
            assert self.scheduler.running == 0 and not self.live_waiting(), "step() idle with work left"
        if self.aborted or len(rec.raised) > raised_before:  # a raising extend makes no call
            return did
        # Admitted in arrival order, and nobody waits while a call has room.
        if joined:
            seqs = [t.seqs[i] for t, i in joined]
            assert seqs == sorted(seqs), f"admitted out of arrival order: {seqs}"
            if waiting:
                assert max(seqs) < min(t.seqs[i] for t, i in waiting), "a later row was admitted first"
        if waiting:
            assert calls, f"{len(waiting)} rows wait, but the step made no call"
            if len(calls[0]) < MAX_BATCH:
                assert self.budget is not None, f"{len(waiting)} rows wait, but the step's call had {len(calls[0])} rows"
                head = min(waiting, key=lambda ti: ti[0].seqs[ti[1]])
                running = [self.by_key[key][0].rows[self.by_key[key][1]] for key in calls[0]]
                assert self.rec.batch_bytes(running + [head[0].rows[head[1]]]) > self.budget, (
                    "the next waiting row fits the budget beside the call's rows, yet waits")
        if self.budget is not None and calls:
            running = [self.by_key[key][0].rows[self.by_key[key][1]] for key in calls[0]]
            assert self.rec.batch_bytes(running) <= self.budget, "a call's rows pass the memory budget"
        return did

    def too_big(self, t: Tracked) -> bool:
        """A row of it could never run: alone it passes the memory budget."""
        return self.budget is not None and any(self.rec.batch_bytes([row]) > self.budget for row in t.rows)

    def cancel_now(self, t: Tracked) -> None:
        if not t.cancelled:
            event(f"client left with rows {sorted(set(t.states()))}")
            t.cancelled_at = (len(self.rec.calls), len(self.rec.extends))
        t.request.cancel()

    # --- rules -----------------------------------------------------------------------------------

    @rule(target=requests, rows=row_lists, stops=stop_lists, stream=st.booleans(),
          interval=st.sampled_from([0.0, 2.0]))
    def submit(self, rows, stops, stream, interval):
        rows = [replace(r) for r in rows]  # each its own object: the batch's entries name them
        queued = self.scheduler.queued
        try:
            request = self.scheduler.submit(rows, stream=stream, interval=interval, stops=stops)
        except SchedulerStopped:
            assert self.stopping or self.aborted, "refused as stopping while serving"
            assert self.scheduler.queued == queued
            return multiple()
        except QueueFull:
            event("submit: QueueFull")
            assert queued + len(rows) > MAX_QUEUE, f"refused with {queued} queued and {len(rows)} more"
            assert self.scheduler.queued == queued, "a refused request left rows in the queue"
            return multiple()
        assert not (self.stopping or self.aborted), "accepted while stopping"
        assert queued + len(rows) <= MAX_QUEUE, f"accepted {len(rows)} rows with {queued} queued"
        seqs = list(range(self.seq, self.seq + len(rows)))
        self.seq += len(rows)
        t = Tracked(request, rows, tuple(stops), stream, self.clock(), seqs, interval=interval)
        self.tracked.append(t)
        for i, row in enumerate(rows):
            self.by_row[id(row)] = (t, i)
        assert t.states() == ["WAITING"] * len(rows)
        return t

    @rule(times=st.integers(1, 6))
    def step(self, times):
        for _ in range(times):
            self.one_step()

    @rule(t=requests)
    def step_then_cancel(self, t):
        """The client leaves during the decode call (perhaps the one that admits or finishes it)."""
        self.one_step(cancel=t)

    @rule(t=consumes(requests))
    def cancel(self, t):
        self.cancel_now(t)

    @rule(seconds=st.sampled_from([1, 2, 4, 11]))
    def advance_clock(self, seconds):
        self.clock.now += seconds

    @precondition(lambda self: not self.stopping and not self.aborted)
    @rule(now=st.integers(0, 5))
    def request_stop(self, now):
        if now:  # a rare event, or the runs would mostly be shutdowns
            return
        self.scheduler.request_stop()
        self.stopping = True

    @precondition(lambda self: not self.aborted)
    @rule(now=st.integers(0, 7))
    def abort(self, now):
        if now:
            return
        self.pump()
        for t in self.tracked:
            if not t.cancelled and not t.answered:
                t.expect_abort = True
        self.scheduler.abort()
        self.aborted = True
        self.pump()
        self.note_engine()

    # --- after every rule ------------------------------------------------------------------------

    @invariant()
    def batch_is_what_the_scheduler_thinks(self):
        s = self.scheduler
        assert s.running_keys == s.batch_keys, f"running {set(s.running_keys)} != batch {set(s.batch_keys)}"
        for t in self.tracked:
            for i, state in enumerate(t.states()):
                if state == "RUNNING":
                    assert (t, i) in self.by_key.values(), f"{t} row {i} RUNNING, never extended"

    @invariant()
    def calls_within_the_batch_size(self):
        assert all(len(keys) <= MAX_BATCH for keys in self.rec.calls), [len(k) for k in self.rec.calls]

    @invariant()
    def counts_match_the_states(self):
        states = [s for t in self.tracked for s in t.states()]
        assert self.scheduler.queued == states.count("WAITING"), (self.scheduler.queued, states)
        assert self.scheduler.running == states.count("RUNNING") == len(self.scheduler.running_keys), (
            self.scheduler.running, states)

    @invariant()
    def one_outcome_each(self):
        for t in self.tracked:
            assert not t.violations, t.violations
            if t.answered:
                assert not {"WAITING", "RUNNING"} & set(t.states()), f"answered {t} still has {t.states()}"

    @invariant()
    def failures_only_where_injected(self):
        for t in self.tracked:
            e = t.error
            if isinstance(e, ShutdownAborted):
                assert t.expect_abort or (t.cancelled and self.aborted), f"{t} aborted, but it was not pending at abort()"
            elif isinstance(e, QueueTimeout):
                assert t.expect_expiry, f"{t} timed out, but it was not due"
            elif isinstance(e, GenerationFailed):
                assert t.faulted or self.too_big(t), f"{t} failed, but no fault touched it: {e!r}"
            elif e is not None:
                raise AssertionError(f"{t} got {e!r}")

    @invariant()
    def left_clients_are_not_served(self):
        for t in self.tracked:
            if t.cancelled:
                calls, extends = t.cancelled_at
                keys = {key for key, (u, _) in self.by_key.items() if u is t}
                # The next boundary drops its rows: no later call holds them.
                later = self.rec.calls[calls:]
                assert not any(keys & set(c) for c in later), f"{t}'s rows ran after its client left"
                joined_later = [row for entries in self.rec.extends[extends:] for _, row in entries]
                assert not any(id(row) in map(id, t.rows) for row in joined_later), f"{t} admitted after it left"

    # --- the end ---------------------------------------------------------------------------------

    def teardown(self):
        try:
            for _ in range(100_000):
                if not self.one_step():
                    break
            else:
                raise AssertionError("the scheduler never went idle")
            s = self.scheduler
            assert s.queued == 0 and s.running == 0, (s.queued, s.running)
            assert s.batch_keys == frozenset() and s.running_keys == frozenset()
            assert self.rec.kv_slots_used() == 0, f"{self.rec.kv_slots_used()} slots held when idle"
            self.batch_is_what_the_scheduler_thinks()
            self.one_outcome_each()
            self.failures_only_where_injected()
            for t in self.tracked:
                self.check_answer(t)
        finally:
            self.loop.close()

    def check_answer(self, t: Tracked) -> None:
        event(f"outcome: {type(t.error).__name__ if t.error else 'answered' if t.answered else 'none'}"
              f"{' (cancelled)' if t.cancelled else ''}")
        for i, finish in enumerate(t.finish):
            if finish is not None:
                event(f"row end: {finish} after {len(t.calls[i])} calls" if len(t.calls[i]) < 2
                      else f"row end: {finish}")
        if t.expect_abort:
            assert isinstance(t.error, ShutdownAborted) or t.cancelled, f"{t}: {t.error!r} at abort()"
        if t.expect_expiry:
            assert isinstance(t.error, QueueTimeout), f"{t}: {t.error!r}, expected QueueTimeout"
        if (t.faulted or self.too_big(t)) and not t.cancelled and not t.expect_expiry and not t.expect_abort:
            assert isinstance(t.error, GenerationFailed), f"{t}: a fault hit it, yet {t.error!r}"
        if not t.cancelled:
            assert t.answered, f"{t} never answered: {t.states()} {t.finish}"
        decode = self.engine.decode
        for i, row in enumerate(t.rows):
            made = [x for c in t.calls[i] for x in c]
            got = t.tokens[i]
            if not made and not got:
                continue
            alone = solo(self.engine, row)
            where = f"{t} row {i} ({row})"
            assert got == made[:len(got)], f"{where}: delivered {got}, the batch made {made}"
            flip = near_tie_flip(row, made, alone)
            if flip is not None:  # the same row up to a draw at the edge of two tokens (RULES.md)
                event("a sampled row took the neighbouring token at a near-tie")
                continue
            assert made == alone[:len(made)], f"{where}: the batch made {made}, alone {alone}"
            finish = t.finish[i]
            if finish is None:
                continue
            # A stop string is watched for a token at a time: the row keeps the tokens up to the
            # one that reached it, and it was reached in the row's last call.
            upto, before_last = stop_token(decode, t.stops, made), len(made) - len(t.calls[i][-1])
            if finish == "stop_sequence":
                assert upto is not None and upto > before_last, (
                    f"{where}: stopped after call {len(t.calls[i]) - 1}, its text reached a stop at token {upto}")
                kept = made[:upto]
            else:
                assert upto is None, f"{where}: its text reached a stop at token {upto} but it ran on to {finish}"
                kept = made
            assert got == kept, f"{where}: finished ({finish}) with {got}, the batch made {made}"
            calls = t.calls[i][:-1] + [kept[before_last:]]  # the last call as the row kept it
            sent = [e.tokens for e in t.events[i]]
            if t.stream and t.interval == 0:  # each call's tokens at once
                assert sent == [c for c in calls[:-1] if c] + [calls[-1]], (where, sent, calls)
            elif t.stream:  # the first tokens at once, then on the clock's ticks
                first = next((c for c in calls if c), [])
                assert sent[0] == first or (len(calls) == 1 and sent == [first]), (where, sent, calls)
            if finish != "stop_sequence":
                assert got == alone, f"{where}: {finish} with {got}, alone {alone}"
                assert finish == ("length" if len(alone) == row.max_tokens else "eos_token"), (where, finish)


class FaultyMachine(SchedulerMachine):
    """As above, with decode calls that raise and rows whose update is an error."""

    @rule(where=st.sampled_from(["before", "after", "extend"]))
    def next_call_raises(self, where):
        self.rec.raise_next = where

    @precondition(lambda self: self.scheduler.running > 0)
    @rule(data=st.data())
    def next_update_fails_a_row(self, data):
        key = data.draw(st.sampled_from(sorted(self.scheduler.running_keys)))
        self.rec.error_keys.add(key)


class BudgetMachine(SchedulerMachine):
    """As the first, with admission within a memory budget: long rows hold the line."""

    budget = 600  # some rows (prompt + max_tokens) pass it alone: they fail, the queue goes on


def machine(cls, engine) -> SchedulerMachine:
    return type(cls.__name__, (cls,), {"engine": engine})


@pytest.mark.parametrize("machine", [SchedulerMachine, FaultyMachine, BudgetMachine], ids=["plain", "faults", "budget"])
@pytest.mark.parametrize("backend", ["tf", "litert"])
def test_scheduler_states(backend, machine, request):
    engine = request.getfixturevalue(f"{backend}_engine")
    SEEN.clear()
    run_state_machine_as_test(globals()["machine"](machine, engine), settings=SETTINGS)
    print(f"\n{backend} {machine.__name__}:", *(f"{n:6.0f} {what}" for what, n in sorted(SEEN.items())), sep="\n  ")


# --- what the machine found, kept as plain tests ---------------------------------------------------


def test_a_streamed_rows_first_tokens_go_out_at_once_even_when_it_joins_late(engine):
    """Request's contract: "With `stream`, a row's first tokens are sent at once". Five streamed
    rows, four at a time: the fifth joins when the first four end; its first tokens waited for
    the request's next tick (the fake clock does not move: until the row's end)."""
    state = machine(SchedulerMachine, engine)()
    rows = [GenerationRow((200,), 30, stream=i) for i in range(5)]
    t = state.submit(rows=rows, stops=(), stream=True, interval=2.0)
    while not t.calls[4]:
        state.step(times=1)
    assert t.events[4], f"row 4 made {t.calls[4]} and nothing went out"
    state.teardown()


def test_a_row_failing_after_its_requests_other_rows_made_tokens_in_that_call_is_the_last_event(engine):
    """A request's one outcome is its exception, and nothing after it. Two streamed rows; at the
    second call row 1's update is an error: row 0's tokens of that call must not follow the
    exception (they were collected before row 1 failed and sent after it)."""
    state = machine(FaultyMachine, engine)()
    rows = [GenerationRow((200,), 100), GenerationRow((201,), 100)]
    t = state.submit(rows=rows, stops=(), stream=True, interval=0.0)
    state.step(times=1)
    key = next(key for key, (u, i) in state.by_key.items() if u is t and i == 1)
    assert state.scheduler.batch_keys and list(state.rec.batches[-1].keys).index(key) == 1
    state.rec.error_keys.add(key)
    state.step(times=1)
    assert isinstance(t.error, GenerationFailed)
    state.one_outcome_each()  # fails: "event after the outcome: RowEvent(index=0, ...)"
    state.teardown()


def test_a_failed_decode_call_gives_its_rows_slots_back(engine):
    """The faults machine found the pool's gauge at 25 slots when idle after an engine fault: the
    failed batch was dropped with its rows still in the pool. It empties itself now."""
    rec = RecordingEngine(engine)
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(rec, max_batch_size=4, batch_timeout=0, max_queue_size=8)
    scheduler.attach(loop)
    try:
        async def submit():
            return scheduler.submit([GenerationRow((200, 201, 202), 60), GenerationRow((13,), 60)])
        request = loop.run_until_complete(submit())
        scheduler.step()  # the rows have slots in the pool now (tf: a call makes 16 tokens)
        rec.raise_next = "before"
        while scheduler.step():
            loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(asyncio.sleep(0))
        assert isinstance(request.events.get_nowait(), GenerationFailed)
        assert engine.kv_slots_used() == 0 and engine.kv_bytes_reserved() == 0
    finally:
        loop.close()
