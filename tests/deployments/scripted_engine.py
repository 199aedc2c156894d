"""A contract-conforming engine for Serve-plumbing tests (injected via `engine_cls`).

It implements `engine.Engine`'s interface (add_request -> async iterator of
RequestOutput, abort, is_healthy, stats, shutdown) with a deterministic token
rule instead of a model; requests go through the engine's own validation
(`engine.validation`, the one context-length check), and it records what it received (prompt ids, the image
embeddings) so tests can compare the data path against an
independent computation. Real-model serving is tested with `engine.Engine`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.sequence import MultimodalInputs, RequestOutput
from engine.validation import validate_request
from models.config import load_model_config


@dataclass(frozen=True, slots=True)
class ScriptedEngineConfig:
    model: str
    max_model_len: int = 4096
    seed: int = 0


def script_tokens(prompt_ids: list[int], count: int, first_regular: int = 300) -> list[int]:
    """The tokens the scripted engine emits: a pure function of the prompt."""
    base = sum(prompt_ids) % 500
    return [first_regular + (base + 7 * i) % 500 for i in range(count)]


class ScriptedEngine:
    config_class = ScriptedEngineConfig
    token_delay_s = 0.01  # per emitted token; subclasses slow it down for backpressure/timeout tests

    def __init__(self, config: ScriptedEngineConfig):
        self.config = config
        self.model_config = load_model_config(config.model)
        self.requests: dict[str, dict[str, Any]] = {}
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.finished: set[str] = set()
        self.max_running = 0  # most requests this engine ever held at once

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], mm_inputs: MultimodalInputs | None, sampling: Any
    ) -> AsyncIterator[RequestOutput]:
        # Raises before anything is queued, as the engine does; no KV cache: only max_model_len bounds.
        limit = self.config.max_model_len
        checked = validate_request(self.model_config, limit, limit, prompt_token_ids, mm_inputs, sampling)
        return self._stream(request_id, prompt_token_ids, mm_inputs, checked.max_tokens, sampling)

    async def _stream(
        self, request_id: str, prompt_token_ids: list[int], mm_inputs: MultimodalInputs | None,
        max_tokens: int, sampling: Any,
    ) -> AsyncIterator[RequestOutput]:
        self.requests[request_id] = {
            "prompt_token_ids": list(prompt_token_ids),
            "image_embeds": mm_inputs.image_embeds.clone() if mm_inputs is not None else None,
            "deepstack_embeds": (mm_inputs.deepstack_embeds.clone()
                                 if mm_inputs is not None and mm_inputs.deepstack_embeds is not None else None),
            "image_grid_thw": mm_inputs.image_grid_thw if mm_inputs is not None else None,
        }
        self.running.add(request_id)
        self.max_running = max(self.max_running, len(self.running))
        tokens = script_tokens(prompt_token_ids, max_tokens)
        try:
            await self._before_first_token()
            for i, token in enumerate(tokens):
                await asyncio.sleep(self.token_delay_s)
                if request_id not in self.running:
                    return
                stop = token in sampling.stop_token_ids
                last = stop or i == len(tokens) - 1
                yield RequestOutput(
                    request_id=request_id,
                    new_token_ids=[token],
                    finish_reason=("stop" if stop else "length") if last else None,
                    num_prompt_tokens=len(prompt_token_ids),
                )
                if last:
                    self.finished.add(request_id)
                    return
        finally:
            self.running.discard(request_id)

    async def _before_first_token(self) -> None:
        """Subclasses hold a request here (it counts as running meanwhile)."""

    def abort(self, request_id: str) -> None:
        # A cancelled add_request iterator has already left `running`; what
        # matters is that the request was known and had not finished.
        if request_id in self.requests and request_id not in self.finished:
            self.aborted.append(request_id)
        self.running.discard(request_id)

    def is_healthy(self) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_cache_usage": 0.0,
                "requests": self.requests, "aborted": list(self.aborted), "max_running": self.max_running}

    def shutdown(self) -> None:
        self.running.clear()


class SlowScriptedEngine(ScriptedEngine):
    """10 tokens a second: requests stay in flight long enough to fill queues or time out."""

    token_delay_s = 0.1


def gate_path(model_dir: str | Path) -> Path:
    """While this file exists, `GatedScriptedEngine` holds every request before its first token."""
    return Path(model_dir) / "splitvl-test-gate"


class GatedScriptedEngine(SlowScriptedEngine):
    """Holds each request before its first token while the test's gate file exists (`gate_path` of the
    model directory): what a test sends meanwhile meets a full engine however slowly it arrives."""

    async def _before_first_token(self) -> None:
        gate = gate_path(self.config.model)
        while gate.exists():
            await asyncio.sleep(0.02)
