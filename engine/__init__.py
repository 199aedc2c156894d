"""One LLM replica's inner loop: scheduler, KV cache, sampler, runner, TP workers, offline API.

Heavy pieces (the model runner, Ray workers) are imported on first use, so
`from engine import SamplingParams` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.config import EngineConfig
from engine.errors import ContextLengthError, EngineDeadError, EngineInputError
from engine.sampling_params import SamplingParams
from engine.sequence import MultimodalInputs, RequestOutput, TokenLogprobs

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.llm import LLM

__all__ = [
    "LLM",
    "ContextLengthError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineInputError",
    "MultimodalInputs",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprobs",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
