"""Batches concurrent calls into one worker call, starting a batch as soon as the worker is free.

The vision replica's tower is one worker: one batch at a time. Ray Serve's `@serve.batch`
forms the next batch while the current one still runs (it waits `batch_wait_timeout_s`
after the first arrival, then queues the batch on its concurrency semaphore), so a request
alone on an idle replica always waits the timeout, and with a timeout of 0 the images that
arrive during a tower call become batches of one each. `EncodeBatcher` forms a batch only
when the worker is free, from every call queued meanwhile (up to `max_batch_size`): no wait
when idle, whole batches under load. `wait_s` keeps an optional window, used only when the
first call finds the worker idle, for calls that arrive together (the images of one request).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class EncodeBatcher(Generic[Item, Result]):
    """`await batcher(item)` -> that item's entry of `run(batch)`, batches run one at a time.

    Args:
        run: the worker: a list of items -> one result per item, in order.
        max_batch_size: the most items in one `run` call.
        wait_s: when a call finds the worker idle, how long it waits for more calls before its batch
            starts (0: at once); a batch that fills up starts at once.
    """

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_batch_size: int, wait_s: float = 0.0):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and wait_s >= 0, got {max_batch_size}, {wait_s}")
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._queue: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    def queued(self) -> int:
        """Calls waiting for a batch (cancelled ones included until a batch skips them)."""
        return len(self._queue)

    async def __call__(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.create_task(self._serve())
        self._arrived.set()
        return await future  # a cancelled caller's future is skipped when its batch forms

    async def _serve(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._gather()
            batch = self._take()
            if batch:
                await self._run_batch(batch)

    async def _gather(self) -> None:
        """Within `wait_s` of now, wait for the batch to fill (the worker is idle here)."""
        deadline = time.monotonic() + self.wait_s
        while len(self._queue) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # its caller is gone
                batch.append((item, future))
        return batch

    async def _run_batch(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self.run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch of {len(batch)} calls returned {len(results)} results")
        except BaseException as exc:  # every caller of this batch gets it; the next batch runs as usual
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("the encoder stopped"))
            if not isinstance(exc, Exception):
                raise  # the replica is shutting down
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
