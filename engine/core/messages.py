"""What the front end (`EngineProcess`) and the engine process send each other over their pipe.

Front end -> engine: `Add`, `Abort`, `Query`, `Stop`. Engine -> front end: `Ready` or
`Failed` once at start-up, then `StepOutputs` (every delta of one engine step in one
message), `Reply` (to a `Query`), `Encoded` (one call of the engine process' input encoder,
`engine/core/encoding.py`) and `Died` (the engine failed; the process lingers only
until the front end stops it). Messages are small: prompts and sampling once per request,
token deltas once per step; image tensors go through shared memory (`SharedInputs`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import GridTHW, MultimodalInputs, RequestOutput
from engine.timeline import EncodeRecord


@runtime_checkable
class DeferredInputs(Protocol):
    """Multimodal inputs the engine process opens itself (e.g. CUDA IPC handles of embeddings,
    which the front end must not open: it holds no CUDA context). Picklable; the engine
    process turns one into `MultimodalInputs` with the `open_inputs` callable given to
    `EngineProcess` at start-up."""

    def placeholder(self) -> MultimodalInputs:
        """The inputs' shapes as meta tensors, with image hashes: what the front end validates."""
        ...


@dataclass(frozen=True, slots=True)
class SharedInputs:
    """`MultimodalInputs` on the wire: its CPU tensors travel as shared-memory handles
    (torch.multiprocessing's reductions), not as pickled bytes.

    Shapes: image_embeds [N_tok, H]; deepstack_embeds [L, N_tok, H] | None.
    """

    image_embeds: torch.Tensor
    deepstack_embeds: torch.Tensor | None
    image_grid_thw: tuple[GridTHW, ...]
    image_hashes: tuple[str, ...] | None

    @classmethod
    def of(cls, mm: MultimodalInputs) -> SharedInputs:
        return cls(mm.image_embeds, mm.deepstack_embeds, mm.image_grid_thw, mm.image_hashes)

    def open(self) -> MultimodalInputs:
        return MultimodalInputs(self.image_embeds, self.deepstack_embeds, self.image_grid_thw, self.image_hashes)


@dataclass(frozen=True, slots=True)
class NewRequest:
    """One validated request. `mm`: None, `SharedInputs`, or a `DeferredInputs`."""

    request_id: str
    prompt_token_ids: list[int]
    mm: Any
    sampling: SamplingParams


def final_output(req: NewRequest, reason: str, error: str | None = None) -> RequestOutput:
    """The last output of a request the engine never ran (aborted or failed before it was queued)."""
    return RequestOutput(req.request_id, [], reason, None, len(req.prompt_token_ids), 0, error)


@dataclass(frozen=True, slots=True)
class Add:
    requests: tuple[NewRequest, ...]


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Query:
    """A read of the engine's state: `name` is "stats" or "timeline"; answered by a `Reply`."""

    query_id: int
    name: str
    args: tuple


@dataclass(frozen=True, slots=True)
class Stop:
    """Abort everything, shut the engine down, exit."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The engine is up: the KV cache size the front end validates against, and the TP
    worker actors' ids (hex; none for TP 1)."""

    num_blocks: int
    worker_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Failed:
    """The engine could not start: the exception (a RuntimeError with its text if it does not pickle)."""

    error: BaseException
    traceback: str


@dataclass(frozen=True, slots=True)
class StepOutputs:
    """Every delta one engine step (or one abort or failure) produced, in delivery order.

    Each as a plain tuple of `RequestOutput`'s fields, in order: 64 frozen dataclasses pickle in
    ~120 us on the engine's step thread, their tuples in ~7 us. `stats`: the engine's `stats()`
    just after this step, attached at most every `STATS_EVERY_S` and whenever the engine has no
    request left (what metrics read without a round trip), else None.
    """

    rows: tuple[tuple, ...]
    stats: dict[str, Any] | None = None

    @classmethod
    def of(cls, outputs: Iterable[RequestOutput], stats: dict[str, Any] | None = None) -> StepOutputs:
        return cls(tuple((o.request_id, o.new_token_ids, o.finish_reason, o.logprobs, o.num_prompt_tokens,
                          o.num_cached_tokens, o.error) for o in outputs), stats)

    def outputs(self) -> list[RequestOutput]:
        return [RequestOutput(*row) for row in self.rows]


@dataclass(frozen=True, slots=True)
class Reply:
    query_id: int
    value: Any


@dataclass(frozen=True, slots=True)
class Encoded:
    """One call of the engine process' input encoder (its vision tower), for the front end's timeline."""

    record: EncodeRecord


@dataclass(frozen=True, slots=True)
class Died:
    """The engine failed (its step loop or start-up of a request): it serves nothing more."""

    message: str
