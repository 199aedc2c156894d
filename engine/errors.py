"""Typed errors of the engine (mapped to OpenAI error envelopes by `deployments`)."""

from __future__ import annotations


class EngineInputError(ValueError):
    """A request the engine refuses before queueing it (user error: HTTP 400).

    `param` names the offending field where there is one; `code` is the OpenAI
    error code for the kind of problem (None: a plain invalid request).
    """

    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(EngineInputError):
    """The prompt, or prompt + max_tokens, exceeds `max_model_len` or the KV cache (HTTP 400).

    The engine's request validation is the one place this limit is checked.
    """

    code = "context_length_exceeded"


class EngineDeadError(RuntimeError):
    """The engine lost a worker or its step loop failed; it serves nothing more (HTTP 503)."""


class KVCacheTooSmallError(RuntimeError):
    """The KV cache cannot hold even one sequence of `max_model_len` tokens."""
