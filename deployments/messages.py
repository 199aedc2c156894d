"""Typed messages of one request's stream: LLMServer -> Router -> ingress / batch job.

`TokenDelta` is what an `LLMServer.generate` stream yields (token ids, the engine's
logprobs). The router turns deltas into text and yields `RouterEvent`s: one
`Start` once the LLM answered, `ChoiceDelta`s, and one `Usage` at the end.
Logprobs leave the router as `TextLogprob`s (tokens as text); `deployments.protocol`
is the one place they become OpenAI's chat or completions shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sequence import TokenLogprobs


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New tokens of one request from the LLM replica.

    server_s: set on the first delta only, the replica's own seconds from receiving
        the call to this delta (the caller subtracts it to get the Serve hops' cost).
    error: the engine's message when finish_reason is "error".
    """

    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    error: str | None = None
    server_s: float | None = None


@dataclass(frozen=True, slots=True)
class TextLogprob:
    """One generated token's logprob, tokens decoded; `top`: (token, logprob), most likely first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Start:
    """The LLM accepted the request: failures before this are HTTP statuses, after it in-band."""

    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """Text (and its tokens' logprobs) added to choice `index`; `finish_reason` on its last delta."""

    index: int
    text: str
    logprobs: tuple[TextLogprob, ...] | None = None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


RouterEvent = Start | ChoiceDelta | Usage
