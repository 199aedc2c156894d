"""EncodeBatcher (deployments/encode_batcher.py): batches form when the worker is free, from every call queued meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from deployments.encode_batcher import EncodeBatcher


class Worker:
    """Records each batch; a batch blocks until `release` is set, when `hold` is."""

    def __init__(self, hold: bool = False, fail_on: object = None):
        self.batches: list[list[object]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.hold, self.fail_on = hold, fail_on

    async def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.started.set()
        if self.hold:
            await self.release.wait()
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [("out", item) for item in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))  # a batch that never starts fails, not hangs


def test_calls_arriving_during_a_batch_form_the_next_batch_whole():
    """With no wait, the first call runs alone at once; the five that arrive one by one while it runs go in one
    batch (`@serve.batch` with a timeout of 0 makes each of them a batch of one: it forms the next batch while
    the current one runs)."""
    async def scenario():
        worker = Worker(hold=True)
        batcher = EncodeBatcher(worker, max_batch_size=8, wait_s=0.0)
        first = asyncio.create_task(batcher("a"))
        await worker.started.wait()
        rest = []
        for x in "bcdef":
            rest.append(asyncio.create_task(batcher(x)))
            await asyncio.sleep(0.005)  # arriving apart; the worker is still busy
        assert batcher.queued() == 5 and worker.batches == [["a"]]
        worker.release.set()
        results = await asyncio.gather(first, *rest)
        return worker.batches, results

    batches, results = run(scenario())
    assert batches == [["a"], list("bcdef")]
    assert results == [("out", x) for x in "abcdef"]


def test_batches_never_exceed_max_batch_size():
    async def scenario():
        worker = Worker(hold=True)
        batcher = EncodeBatcher(worker, max_batch_size=4, wait_s=0.0)
        first = asyncio.create_task(batcher(0))
        await worker.started.wait()
        rest = [asyncio.create_task(batcher(i)) for i in range(1, 11)]
        await asyncio.sleep(0)
        worker.release.set()
        results = await asyncio.gather(first, *rest)
        return worker.batches, results

    batches, results = run(scenario())
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert results == [("out", i) for i in range(11)]


def test_an_idle_worker_waits_its_window_for_calls_arriving_together():
    """wait_s > 0: calls of one burst share a batch; a batch that fills up does not wait out the window."""
    async def scenario():
        worker = Worker()
        batcher = EncodeBatcher(worker, max_batch_size=3, wait_s=60.0)
        return await asyncio.gather(*(batcher(x) for x in "xyz")), worker.batches

    results, batches = run(scenario())
    assert batches == [list("xyz")] and results == [("out", x) for x in "xyz"]


def test_a_failed_batch_fails_its_callers_only():
    async def scenario():
        worker = Worker(hold=True, fail_on="bad")
        batcher = EncodeBatcher(worker, max_batch_size=8)
        first = asyncio.create_task(batcher("ok1"))
        await worker.started.wait()
        doomed = [asyncio.create_task(batcher(x)) for x in ("ok2", "bad")]
        await asyncio.sleep(0)
        worker.release.set()
        assert await first == ("out", "ok1")
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        after = await batcher("ok3")
        return outcomes, after, worker.batches

    outcomes, after, batches = run(scenario())
    assert all(isinstance(o, ValueError) and "bad item bad" in str(o) for o in outcomes)
    assert after == ("out", "ok3") and batches[-1] == ["ok3"]


def test_a_caller_cancelled_before_its_batch_is_left_out():
    async def scenario():
        worker = Worker(hold=True)
        batcher = EncodeBatcher(worker, max_batch_size=8)
        first = asyncio.create_task(batcher("a"))
        await worker.started.wait()
        gone, kept = asyncio.create_task(batcher("gone")), asyncio.create_task(batcher("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        worker.release.set()
        return await first, await kept, gone.cancelled(), worker.batches

    first, kept, cancelled, batches = run(scenario())
    assert cancelled and batches == [["a"], ["kept"]]
    assert first == ("out", "a") and kept == ("out", "kept")


def test_a_worker_returning_the_wrong_count_fails_the_batch():
    async def short(items):
        return items[:-1]

    async def scenario():
        batcher = EncodeBatcher(short, 4, wait_s=60.0)
        return await asyncio.gather(*(batcher(i) for i in range(4)), return_exceptions=True)

    outcomes = run(scenario())
    assert all(isinstance(o, RuntimeError) and "4 calls returned 3" in str(o) for o in outcomes)


@pytest.mark.parametrize("size, wait", [(0, 0.0), (4, -1.0)])
def test_bad_settings_are_refused(size, wait):
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        EncodeBatcher(Worker(), size, wait)
