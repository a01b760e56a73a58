"""The batcher alone, with a fake batch function: no model, no server (as Ray's batching tests)."""

import asyncio
import threading
import time

import pytest

from service.batcher import Batcher, BatcherStopped, BatchFailed, QueueFull


class Recorder:
    """A batch function that records the batches it saw and doubles each item."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = gate

    def __call__(self, items):
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append(list(items))
        return [2 * x for x in items]


def run(coro):
    return asyncio.run(coro)


def make(fn, **kw):
    options = dict(max_batch_size=4, batch_timeout=0.05, max_queue_size=16) | kw
    batcher = Batcher(fn, **options)
    batcher.start()
    return batcher


def test_concurrent_callers_share_a_batch_and_get_their_own_results():
    async def main():
        fn = Recorder()
        b = make(fn)
        results = await asyncio.gather(b.submit([1]), b.submit([2, 3]), b.submit([4]))
        await b.stop()
        return fn.batches, results

    batches, results = run(main())
    assert results == [[2], [4, 6], [8]]
    assert batches == [[1, 2, 3, 4]]


def test_a_full_batch_does_not_wait_for_the_timeout():
    async def main():
        b = make(Recorder(), batch_timeout=10)
        t0 = time.monotonic()
        await b.submit([1, 2, 3, 4])
        elapsed = time.monotonic() - t0
        await b.stop()
        return elapsed

    assert run(main()) < 1


def test_a_lone_item_runs_after_the_timeout():
    async def main():
        fn = Recorder()
        b = make(fn, batch_timeout=0.2)
        t0 = time.monotonic()
        await b.submit([7])
        elapsed = time.monotonic() - t0
        await b.stop()
        return fn.batches, elapsed

    batches, elapsed = run(main())
    assert batches == [[7]]
    assert 0.15 < elapsed < 2


def test_a_large_request_is_split_across_batches_in_order():
    async def main():
        fn = Recorder()
        b = make(fn, max_batch_size=3)
        result = await b.submit(list(range(8)))
        await b.stop()
        return fn.batches, result

    batches, result = run(main())
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert result == [0, 2, 4, 6, 8, 10, 12, 14]


def test_queue_bound_rejects_a_whole_request_and_keeps_serving():
    async def main():
        gate = threading.Event()
        fn = Recorder(gate=gate)
        b = make(fn, max_batch_size=2, max_queue_size=3, batch_timeout=0)
        first = asyncio.create_task(b.submit([1, 2]))  # taken by the worker, which then blocks
        await asyncio.sleep(0.1)
        queued = asyncio.create_task(b.submit([3, 4, 5]))  # fills the queue
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="3 prompts are waiting and this request adds 1"):
            await b.submit([6])
        assert b.queued == 3
        gate.set()
        results = await asyncio.gather(first, queued)
        after = await b.submit([6])
        await b.stop()
        return results, after

    results, after = run(main())
    assert results == [[2, 4], [6, 8, 10]]
    assert after == [12]


def test_an_exception_reaches_every_caller_of_the_batch_and_batching_goes_on():
    calls = []

    def flaky(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    async def main():
        b = make(flaky)
        outcomes = await asyncio.gather(b.submit([1]), b.submit([2]), return_exceptions=True)
        after = await b.submit([3])
        await b.stop()
        return outcomes, after

    outcomes, after = run(main())
    assert [type(o) for o in outcomes] == [BatchFailed, BatchFailed]
    assert str(outcomes[0]) == "generation failed: boom"
    assert after == [3]


def test_a_result_list_of_the_wrong_length_is_an_error():
    async def main():
        b = make(lambda items: items[:-1])
        with pytest.raises(BatchFailed, match="returned 1 results for 2 items"):
            await b.submit([1, 2])
        await b.stop()

    run(main())


def test_stop_finishes_queued_work_then_refuses_new_work():
    async def main():
        fn = Recorder(delay=0.05)
        b = make(fn, max_batch_size=1, batch_timeout=0)
        pending = [asyncio.create_task(b.submit([i])) for i in range(3)]
        await asyncio.sleep(0.01)
        await b.stop()
        assert not b.alive
        with pytest.raises(BatcherStopped):
            await b.submit([9])
        return [await p for p in pending]

    assert run(main()) == [[0], [2], [4]]


def test_cancelled_callers_cost_no_work():
    async def main():
        gate = threading.Event()
        fn = Recorder(gate=gate)
        b = make(fn, max_batch_size=1, batch_timeout=0)
        first = asyncio.create_task(b.submit([1]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(b.submit([2]))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        await first
        await b.submit([3])
        await b.stop()
        return fn.batches

    assert run(main()) == [[1], [3]]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        Batcher(lambda x: x, max_batch_size=0, batch_timeout=0, max_queue_size=1)
    with pytest.raises(ValueError):
        Batcher(lambda x: x, max_batch_size=1, batch_timeout=-1, max_queue_size=1)
