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
from typing import Any, Protocol

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
    """An `LLMServer` body owned by this replica."""

    def __init__(self, server: Any):
        self.server = server
        self._closing: set[asyncio.Task] = set()

    def stream(self, request_id: str, ids: list[int], sampling: SamplingParams, refs: list[Any] | None,
               keys: list[str] | None) -> TokenStream:
        return LocalStream(self.server.generate(request_id, ids, sampling, refs, keys), self._closing)
