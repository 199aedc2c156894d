"""How a router reaches its LLM: through the LLMServer deployment's handle, or in-process.

Both give `stream(request_id, ids, sampling, refs, keys)`: an async iterator of
`TokenDelta`s with `cancel()`, which ends the request in the engine. Over a
handle every delta is one Ray streamed item (a Serve hop per token); in-process
(`llm.colocate_ingress`: the ingress replica owns the engine) a delta is a
generator step in the same event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

from deployments.errors import ServiceUnavailableError
from deployments.messages import TokenDelta
from engine.sampling_params import SamplingParams


class TokenStream(Protocol):
    def __aiter__(self) -> AsyncIterator[TokenDelta]: ...

    def cancel(self) -> None: ...


class LLMClient(Protocol):
    def stream(self, request_id: str, ids: list[int], sampling: SamplingParams, refs: list[Any] | None,
               keys: list[str] | None) -> TokenStream: ...


class HandleLLM:
    """The LLMServer deployment behind a Serve handle (`DeploymentResponseGenerator` has `cancel`)."""

    def __init__(self, handle: Any):
        self.handle = handle.options(stream=True)

    def stream(self, request_id: str, ids: list[int], sampling: SamplingParams, refs: list[Any] | None,
               keys: list[str] | None) -> TokenStream:
        return self.handle.generate.remote(request_id, ids, sampling, refs, keys)


class LocalStream:
    """One `LLMServer.generate` run in this process; `cancel()` closes it (the server aborts the request)."""

    def __init__(self, agen: AsyncIterator[TokenDelta], closing: set[asyncio.Task]):
        self._agen, self._closing = agen, closing

    def __aiter__(self) -> AsyncIterator[TokenDelta]:
        return self._agen

    def cancel(self) -> None:
        task = asyncio.get_running_loop().create_task(self._agen.aclose())
        self._closing.add(task)  # keep it alive until done
        task.add_done_callback(self._closing.discard)


class LocalLLM:
    """An `LLMServer` body owned by this replica, behind the bounds a Serve handle would apply:
    `max_ongoing` streams in the engine at once, `max_queued` more waiting (-1: unbounded), and
    the next one refused with the router's overload 503 (`ServiceUnavailableError`, code overloaded).
    """

    def __init__(self, server: Any, max_ongoing: int, max_queued: int):
        self.server, self.max_queued = server, max_queued
        self._slots = asyncio.Semaphore(max_ongoing)
        self._waiting = 0
        self._closing: set[asyncio.Task] = set()

    def stream(self, request_id: str, ids: list[int], sampling: SamplingParams, refs: list[Any] | None,
               keys: list[str] | None) -> TokenStream:
        return LocalStream(self._admitted(request_id, ids, sampling, refs, keys), self._closing)

    async def _admitted(self, *args: Any) -> AsyncIterator[TokenDelta]:
        queued = self._slots.locked()
        if queued and 0 <= self.max_queued <= self._waiting:
            raise ServiceUnavailableError("the server is overloaded; retry later", code="overloaded")
        self._waiting += queued
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= queued
        try:
            async with aclosing(self.server.generate(*args)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            self._slots.release()
