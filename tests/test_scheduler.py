"""The scheduler alone, with the fake engine: no model, no server (as Ray's batching tests)."""

import asyncio
import threading
import time

import pytest

from fakes import FakeEngine, RecordingEngine
from service.engine import GenerationRow, RowUpdate
from service.scheduler import (GenerationFailed, QueueFull, QueueTimeout, RowEvent, Scheduler, SchedulerStats,
                               SchedulerStopped, ShutdownAborted)


def row(text: str, max_tokens: int = 50) -> GenerationRow:
    return GenerationRow(tuple(ord(c) for c in text), max_tokens)


def start(engine: FakeEngine, **kw) -> Scheduler:
    options = dict(max_batch_size=4, batch_timeout=0, max_queue_size=16) | kw
    scheduler = Scheduler(engine, **options)
    scheduler.start()
    return scheduler


class Slow(FakeEngine):
    """Each decode call takes `delay` seconds, so requests can arrive while a batch runs."""

    def __init__(self, delay: float = 0.01):
        super().__init__()
        self.delay = delay

    def new_batch(self):
        batch = super().new_batch()
        step = batch.step

        def slow_step():
            time.sleep(self.delay)
            return step()

        batch.step = slow_step
        return batch


def test_a_short_request_joins_a_running_batch_and_is_answered_before_the_long_one_ends():
    async def main():
        engine = Slow()
        s = start(engine)
        long = s.submit([row("a" * 40)])
        await asyncio.sleep(0.05)  # the long row is decoding
        short = s.submit([row("xyz")])
        short_result = await short.results()
        long_done_then = s.running == 1
        long_result = await long.results()
        await s.stop()
        return engine.calls, short_result, long_result, long_done_then

    calls, short_result, long_result, long_still_running = asyncio.run(main())
    assert short_result == [[ord(c) for c in "zyx"]]
    assert long_result == [[ord("a")] * 40]
    assert long_still_running  # answered at once, not when the batch ended
    joined = next(i for i, keys in enumerate(calls) if len(keys) == 2)
    assert joined > 0 and calls[joined][0] == calls[0][0]  # it joined the long row's batch
    assert sum(len(keys) == 2 for keys in calls) == 4  # 3 tokens, then the call that gives end-of-text


def test_waiting_rows_are_admitted_in_arrival_order_up_to_the_batch_size():
    async def main():
        engine = FakeEngine()
        engine.generate_gate.clear()
        s = start(engine, max_batch_size=2)
        first = s.submit([row("ab"), row("cd")])
        while not engine.generating.is_set():
            await asyncio.sleep(0.001)
        second = s.submit([row("ef")])
        third = s.submit([row("gh")])
        assert s.queued == 2
        engine.generate_gate.set()
        results = await asyncio.gather(first.results(), second.results(), third.results())
        await s.stop()
        return engine.calls, results

    calls, results = asyncio.run(main())
    assert results == [[[98, 97], [100, 99]], [[102, 101]], [[104, 103]]]
    assert max(len(keys) for keys in calls) == 2
    # "ef" joined first (when "ab"/"cd" finished), before "gh", which joined beside it or after.
    first_seen = {}
    for i, keys in enumerate(calls):
        for key in keys:
            first_seen.setdefault(key, i)
    order = sorted(first_seen, key=first_seen.get)
    assert order[:2] == [0, 1] and order.index(2) < order.index(3)


def test_a_cancelled_request_leaves_at_the_next_call_and_the_others_are_unchanged():
    cancelled = []

    async def main():
        engine = Slow()
        s = start(engine, stats=SchedulerStats(rows_cancelled=cancelled.append))
        gone = s.submit([row("b" * 40), row("c" * 40)])
        stays = s.submit([row("d" * 30)])
        await asyncio.sleep(0.05)
        calls_then = len(engine.calls)
        gone.cancel()
        result = await stays.results()
        await s.stop()
        return engine.calls, calls_then, result

    calls, calls_then, result = asyncio.run(main())
    assert result == [[ord("d")] * 30]
    assert sum(cancelled) == 2
    keys_after = [keys for keys in calls[calls_then + 2:]]
    assert keys_after and all(keys == [2] for keys in keys_after)  # only the staying row ran on


def test_a_cancelled_request_still_waiting_never_runs():
    async def main():
        engine = FakeEngine()
        engine.generate_gate.clear()
        s = start(engine, max_batch_size=1)
        running = s.submit([row("ab")])
        while not engine.generating.is_set():
            await asyncio.sleep(0.001)
        waiting = s.submit([row("cd")])
        waiting.cancel()
        engine.generate_gate.set()
        await running.results()
        await s.stop()
        return engine.calls

    assert all(keys == [0] for keys in asyncio.run(main()))


def test_a_failed_decode_call_fails_its_rows_and_the_next_batch_runs():
    async def main():
        engine = FakeEngine(fail_with=RuntimeError("out of cheese"))
        s = start(engine)
        failed = s.submit([row("ab"), row("cd")])
        with pytest.raises(GenerationFailed, match="generation failed: out of cheese"):
            await failed.results()
        engine.fail_with = None
        result = await s.submit([row("ef")]).results()
        await s.stop()
        return result

    assert asyncio.run(main()) == [[102, 101]]


def test_a_request_that_does_not_fit_the_queue_is_refused_whole():
    async def main():
        engine = FakeEngine()
        engine.generate_gate.clear()
        s = start(engine, max_batch_size=1, max_queue_size=2)
        s.submit([row("ab")])
        while not engine.generating.is_set():
            await asyncio.sleep(0.001)
        s.submit([row("cd")])
        with pytest.raises(QueueFull, match="1 prompts are waiting and this request adds 2"):
            s.submit([row("ef"), row("gh")])
        assert s.queued == 1
        engine.generate_gate.set()
        await s.stop()

    asyncio.run(main())


def test_stop_finishes_running_and_queued_rows_then_refuses_new_ones():
    async def main():
        engine = Slow(0.005)
        s = start(engine, max_batch_size=1)
        a = s.submit([row("ab")])
        b = s.submit([row("cd")])
        await s.stop()
        with pytest.raises(SchedulerStopped):
            s.submit([row("ef")])
        return await a.results(), await b.results()

    assert asyncio.run(main()) == ([[98, 97]], [[100, 99]])


def test_stop_with_a_grace_answers_what_is_left_when_it_ends():
    async def main():
        engine = Slow(0.01)
        s = start(engine, max_batch_size=1)
        running = s.submit([row("a" * 200, max_tokens=200)])  # 200 calls: about 2 s
        queued = s.submit([row("bc")])
        await asyncio.sleep(0.05)
        started = time.monotonic()
        finished = await s.stop(grace=0.1)
        took = time.monotonic() - started
        outcomes = []
        for request in (running, queued):
            with pytest.raises(ShutdownAborted, match="the server shut down before this request"):
                await request.results()
            outcomes.append("aborted")
        return finished, took, outcomes, s.alive, engine.calls

    finished, took, outcomes, alive, calls = asyncio.run(main())
    assert finished is False and outcomes == ["aborted", "aborted"] and not alive
    assert 0.1 <= took < 1.0  # the grace, not the 2 s the running row would take (slack for a loaded CI)
    assert all(keys == [0] for keys in calls) and len(calls) < 150  # "bc" never ran
    # As a stopping server's error (503) and as a failed generation (said in a stream).
    assert issubclass(ShutdownAborted, SchedulerStopped) and issubclass(ShutdownAborted, GenerationFailed)


def test_stop_within_the_grace_finishes_everything():
    async def main():
        s = start(Slow(0.002), max_batch_size=1)
        a, b = s.submit([row("ab")]), s.submit([row("cd")])
        return await s.stop(grace=5), await a.results(), await b.results()

    assert asyncio.run(main()) == (True, [[98, 97]], [[100, 99]])


def test_abort_during_a_stop_answers_the_rest_at_once():
    async def main():
        engine = Slow(0.01)
        s = start(engine, max_batch_size=1)
        running = s.submit([row("a" * 300, max_tokens=300)])  # about 3 s
        queued = s.submit([row("bc"), row("de")])
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(s.stop(grace=60))
        await asyncio.sleep(0.05)
        assert not stopping.done()
        with pytest.raises(SchedulerStopped):
            s.submit([row("x")])
        started = time.monotonic()
        s.abort()
        errors = []
        for request in (queued, running):
            try:
                await request.results()
            except ShutdownAborted as exc:
                errors.append(str(exc))
        finished = await stopping
        return finished, time.monotonic() - started, errors

    finished, took, errors = asyncio.run(main())
    assert finished is False and took < 1.0  # at once, not the grace of 60 s nor the 3 s row
    assert errors == ["the server shut down before this request finished; retry later",
                      "the server shut down before this request finished; retry later"]


def test_a_request_still_queued_after_the_queue_wait_bound_is_refused_whole():
    async def main():
        engine = Slow(0.01)
        s = start(engine, max_batch_size=1, max_queue_wait=0.1)
        long = s.submit([row("a" * 100, max_tokens=100)])  # about 1 s, holding the only slot
        await asyncio.sleep(0.02)
        late = s.submit([row("bc"), row("de")])
        started = time.monotonic()
        with pytest.raises(QueueTimeout, match=r"waited 0\.1 s in the queue, over the queue-wait bound of 0\.1 s"):
            await late.results()
        waited = time.monotonic() - started
        queued_after = s.queued
        result = await long.results()
        after = await s.submit([row("fg")]).results()  # serving goes on
        await s.stop()
        return waited, queued_after, result, after, engine.calls

    waited, queued_after, result, after, calls = asyncio.run(main())
    assert 0.1 <= waited < 0.6  # refused at the bound, not when the 1 s row ends
    assert queued_after == 0
    assert result == [[97] * 100] and after == [[103, 102]]
    assert {key for keys in calls for key in keys} == {0, 1}  # the late rows never ran
    # Answered as a full queue is (503 + Retry-After), and said in a stream as a failure.
    assert issubclass(QueueTimeout, QueueFull) and issubclass(QueueTimeout, GenerationFailed)


def test_a_request_with_rows_running_is_not_timed_out_by_its_queued_rows():
    async def main():
        s = start(Slow(0.01), max_batch_size=1, max_queue_wait=0.05)
        request = s.submit([row("a" * 10), row("b" * 10), row("c" * 10)])  # 0.1 s each, one at a time
        result = await request.results()
        await s.stop()
        return result

    assert asyncio.run(main()) == [[97] * 10, [98] * 10, [99] * 10]


def test_with_the_batch_empty_the_first_arrival_waits_for_others_up_to_the_timeout():
    async def main():
        engine = FakeEngine()
        s = start(engine, batch_timeout=0.2)
        first = s.submit([row("ab")])
        await asyncio.sleep(0.05)
        second = s.submit([row("cd")])
        await asyncio.gather(first.results(), second.results())
        await s.stop()
        return engine.calls

    assert asyncio.run(main())[0] == [0, 1]


def events_of(stream: bool) -> list[RowEvent]:
    async def main():
        s = start(FakeEngine())
        request = s.submit([row("abc", max_tokens=2), row("xyz0", max_tokens=9)], stream=stream)
        events = []
        while sum(e.finish is not None for e in events) < 2:
            events.append(await request.events.get())
        await s.stop()
        return events

    return asyncio.run(main())


def test_a_streamed_request_hears_of_each_rows_tokens_as_they_are_made():
    events = events_of(stream=True)
    assert [e for e in events if e.index == 0] == [RowEvent(0, [99]), RowEvent(0, [98], "length")]
    # "xyz0" reversed starts with "0", the fake end-of-text: no tokens, finished.
    assert [e for e in events if e.index == 1] == [RowEvent(1, [], "eos_token")]


def test_an_unstreamed_request_hears_once_per_row_when_it_ends():
    events = events_of(stream=False)
    assert sorted(events, key=lambda e: e.index) == [RowEvent(0, [99, 98], "length"), RowEvent(1, [], "eos_token")]


def test_timings_reach_the_stats_hooks():
    seen = {"queue": [], "ttft": [], "tpot": [], "rows": []}

    async def main():
        stats = SchedulerStats(queue_wait=seen["queue"].append, time_to_first_token=seen["ttft"].append,
                               time_per_output_token=seen["tpot"].append, batch_size=seen["rows"].append)
        s = start(Slow(0.01), stats=stats)
        await s.submit([row("abcd"), row("ef")]).results()
        await s.stop()

    asyncio.run(main())
    assert len(seen["queue"]) == 2 and len(seen["ttft"]) == 2 and len(seen["tpot"]) == 2
    assert all(0.005 < t < 1 for t in seen["tpot"])
    assert seen["rows"][0] == 2


def test_a_streamed_request_gets_its_first_token_at_once_then_paced_batches():
    async def main():
        s = start(Slow(0.01))
        request = s.submit([row("a" * 30, max_tokens=30)], stream=True, interval=0.05)
        events = []
        while not events or events[-1].finish is None:
            events.append(await request.events.get())
        await s.stop()
        return events

    events = asyncio.run(main())
    assert len(events[0].tokens) == 1  # the first token is not held
    assert sum(len(e.tokens) for e in events) == 30 and events[-1].finish == "length"
    # 30 calls of 10 ms, paced at 50 ms: a handful of events, not one per token.
    assert 4 <= len(events) <= 12 and max(len(e.tokens) for e in events) >= 3


def test_a_row_whose_text_reaches_a_stop_string_ends_at_that_call():
    async def main():
        engine = FakeEngine()
        s = start(engine)
        # "abcdefgh" reversed is "hgfedcba": the stop "ed" spans two tokens.
        request = s.submit([row("abcdefgh"), row("xy")], stops=["ed", "zz"])
        results = await request.results()
        await s.stop()
        return engine.calls, results, request

    calls, results, request = asyncio.run(main())
    assert results == [[ord(c) for c in "hgfed"], [ord("y"), ord("x")]]
    # Row 0 ran 5 calls (h, g, f, e, d) and left before a 6th.
    assert sum(0 in keys for keys in calls) == 5


# --- the interleavings of issue 18, driven one step at a time (no worker thread) ----------------


class Manual:
    """A scheduler driven by the test: `attach` to a loop the test owns, then `step()`; events
    reach requests once the loop runs."""

    def __init__(self, engine: FakeEngine, **kw):
        self.loop = asyncio.new_event_loop()
        self.engine = engine
        self.scheduler = Scheduler(engine, **(dict(max_batch_size=4, batch_timeout=0, max_queue_size=64) | kw))
        self.scheduler.attach(self.loop)

    def submit(self, rows, **kw):
        async def submit():
            return self.scheduler.submit(rows, **kw)
        return self.loop.run_until_complete(submit())

    def step(self) -> bool:
        ran = self.scheduler.step()
        self.loop.run_until_complete(asyncio.sleep(0))
        assert self.scheduler.running_keys == self.scheduler.batch_keys
        assert len(self.scheduler.batch_keys) <= self.scheduler.max_batch_size
        return ran

    def drain(self) -> None:
        while self.step():
            pass

    def outcome(self, request):
        """The request's events so far: RowEvents, or an exception."""
        out = []
        while not request.events.empty():
            out.append(request.events.get_nowait())
        return out

    def close(self):
        self.loop.close()


def test_when_every_running_row_leaves_at_once_the_batch_is_emptied_before_the_next_row_joins():
    # Issue 18, 1: every running client left at the same boundary; the scheduler dropped them
    # but skipped the batch, so the next request's call returned their rows too (KeyError: 500).
    m = Manual(FakeEngine())
    gone = [m.submit([row("abcdefgh" * 4)], stream=True) for _ in range(3)]
    m.step()
    m.step()
    for request in gone:
        request.cancel()
    m.step()  # they leave; nothing else runs
    assert m.scheduler.batch_keys == frozenset() and m.scheduler.running == 0
    late = m.submit([row("xyz", 16)])
    m.drain()
    assert m.outcome(late) == [RowEvent(0, [ord(c) for c in "zyx"], "eos_token")]
    assert all(r.state.name == "GONE" for request in gone for r in request.rows)
    m.close()


def test_rows_ended_by_a_stop_string_free_their_place_once():
    # Issue 18, 2: a stopped row was counted as leaving twice, so more rows than the batch holds
    # were admitted ("a batch holds at most 8 rows": 500 for every request in it).
    engine = FakeEngine()
    m = Manual(engine, max_batch_size=4)
    request = m.submit([row(f"ab{chr(ord('c') + i)}") for i in range(12)], stops=["b"])
    m.drain()
    events = m.outcome(request)
    assert max(len(keys) for keys in engine.calls) <= 4
    assert sorted(e.index for e in events) == list(range(12)) and all(e.finish is not None for e in events)
    assert [r.state.name for r in request.rows].count("STOPPED") == 12
    m.close()


def test_a_row_whose_own_work_fails_fails_its_request_alone():
    class OneRowFails(FakeEngine):
        def new_batch(self):
            batch = super().new_batch()
            step = batch.step

            def failing_step():
                updates = step()
                return [RowUpdate(u.key, [], error=ValueError("bad row")) if u.tokens == [ord("!")] else u
                        for u in updates]
            batch.step = failing_step
            return batch

    m = Manual(OneRowFails())
    bad = m.submit([row("x!yz"), row("abc")])  # "!" is its fourth token... its second from the end
    good = m.submit([row("hello")])
    m.drain()
    failure = m.outcome(bad)
    assert len(failure) == 1 and isinstance(failure[0], GenerationFailed) and "bad row" in str(failure[0])
    assert m.outcome(good) == [RowEvent(0, [ord(c) for c in "olleh"], "eos_token")]
    assert {r.state.name for r in bad.rows} == {"FAILED"}
    m.close()


def test_a_stop_watch_that_raises_fails_its_own_request_only():
    class BadDecode(FakeEngine):
        def decode(self, ids):
            if ord("!") in ids:
                raise UnicodeError("cannot decode")
            return super().decode(ids)

    m = Manual(BadDecode())
    bad = m.submit([row("ab!")], stops=["zz"])
    good = m.submit([row("abc")], stops=["zz"])
    m.drain()
    assert [type(e) for e in m.outcome(bad)] == [GenerationFailed]
    assert m.outcome(good) == [RowEvent(0, [ord(c) for c in "cba"], "eos_token")]
    m.close()


def test_a_failed_call_fails_its_batch_and_leaves_the_queue_alone():
    engine = RecordingEngine(FakeEngine())
    m = Manual(engine, max_batch_size=2)
    running = m.submit([row("abcdef"), row("ghijkl")])
    waiting = m.submit([row("mno")])
    m.step()
    m.step()
    engine.raise_next = "before"  # the third call
    m.drain()
    assert [type(e) for e in m.outcome(running)] == [GenerationFailed]
    assert m.outcome(waiting) == [RowEvent(0, [ord(c) for c in "onm"], "eos_token")]
    m.close()


class Budgeted(FakeEngine):
    """A row costs a byte a prompt token and a new token, against `budget`."""

    def __init__(self, budget: int):
        super().__init__()
        self.memory_budget = budget

    def batch_bytes(self, rows):
        return sum(len(r.prompt_ids) + r.max_tokens for r in rows)


def test_a_row_that_the_memory_budget_does_not_hold_waits_until_one_leaves():
    m = Manual(Budgeted(100), max_batch_size=4)
    first = m.submit([row("a" * 30, 30)])  # 60 of 100
    second = m.submit([row("b" * 20, 20)])  # 40 more: fits
    third = m.submit([row("c" * 5, 5)])  # 10 more: waits
    m.step()
    assert m.scheduler.running == 2 and m.scheduler.queued == 1
    assert m.scheduler.admitted_bytes == 100
    m.drain()
    assert [len(e.tokens) for r in (first, second, third) for e in m.outcome(r)] == [30, 20, 5]
    assert m.scheduler.admitted_bytes == 0
    m.close()


def test_a_row_that_could_never_fit_fails_alone():
    m = Manual(Budgeted(50))
    huge = m.submit([row("a" * 40, 40)])
    small = m.submit([row("ab", 4)])
    m.drain()
    assert [type(e) for e in m.outcome(huge)] == [GenerationFailed]
    assert m.outcome(small) == [RowEvent(0, [ord("b"), ord("a")], "eos_token")]
    m.close()


def test_call_runs_between_decode_calls_on_the_thread_that_decodes():
    async def main():
        engine = Slow()
        s = start(engine)
        long = s.submit([row("a" * 30)])
        threads = await asyncio.gather(s.call(threading.get_ident), s.call(lambda: 1 / 0), return_exceptions=True)
        await long.results()
        await s.stop()
        return threads, s._thread.ident

    (ident, error), worker = asyncio.run(main())
    assert ident == worker and isinstance(error, ZeroDivisionError)
