"""Per-request output streams, and delivery of one step's outputs to them from the step thread."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from engine.sequence import RequestOutput


def merge_outputs(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """One delta with the tokens (and logprobs) of `first` then `second`; the state of `second`."""
    logprobs = None
    if first.logprobs is not None or second.logprobs is not None:
        logprobs = list(first.logprobs or []) + list(second.logprobs or [])
    return dataclasses.replace(
        second, new_token_ids=list(first.new_token_ids) + list(second.new_token_ids), logprobs=logprobs,
    )


def put_many(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    """Deliver outputs to their streams from any thread: one wake-up per event loop.

    `call_soon_threadsafe` writes to the loop's self-pipe each time (a syscall);
    a decode step of a 64-request batch would pay it 64 times.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
    for stream, out in items:
        by_loop.setdefault(stream._loop, []).append((stream, out))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the consumers' loop is closed: nobody is listening any more
            pass


def _deliver(batch: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in batch:
        stream._queue.put_nowait(out)


class RequestStream:
    """Async iterator of one request's `RequestOutput` deltas; ends after the finished one.

    `aclose()` (or leaving the iteration early and calling it) aborts the request:
    it calls `abort(request_id)`.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None]):
        self.request_id = request_id
        self._abort = abort
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._done = False

    def put(self, out: RequestOutput) -> None:
        """From any thread; outputs arrive in the order of the calls."""
        put_many([(self, out)])

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        """The next delta; deltas that queued up meanwhile (a consumer slower than the
        engine's steps, e.g. a busy replica streaming over Ray) come merged in one."""
        if self._done:
            raise StopAsyncIteration
        out = await self._queue.get()
        while not out.finished and not self._queue.empty():
            out = merge_outputs(out, self._queue.get_nowait())
        if out.finished:
            self._done = True
        return out

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._abort(self.request_id)
