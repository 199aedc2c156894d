"""Where the model steps run: in this process (TP 1) or on TP worker actors (engine.worker)."""

from __future__ import annotations

from typing import Protocol

from engine.config import EngineConfig
from engine.launch import LaunchedStep
from engine.runner import ModelRunner
from engine.step import StepMessage, StepResult
from models.config import ModelConfig
from models.layers.parallel import ParallelContext


class Executor(Protocol):
    num_blocks: int

    def execute(self, msg: StepMessage) -> StepResult | None:
        """Run one step on every rank; rank 0's result. Raises if a rank fails."""

    def is_alive(self) -> bool: ...

    def on_failure(self) -> None:
        """Release whatever a failed step left behind (hung ranks)."""

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """A single rank in this process: the model, its KV cache, no Ray."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        self.runner = ModelRunner(config, ParallelContext(), model_config)
        self.num_blocks = self.runner.profile_num_blocks(max_model_len)
        self.runner.init_kv_cache(self.num_blocks, max_model_len)

    def execute(self, msg: StepMessage) -> StepResult | None:
        return self.runner.execute(msg)

    def launch(self, msg: StepMessage) -> LaunchedStep:
        """Run a step without waiting for its sampled ids (async scheduling; see `ModelRunner.launch`)."""
        return self.runner.launch(msg)

    def collect(self, step: LaunchedStep) -> StepResult:
        return self.runner.collect(step)

    def is_alive(self) -> bool:
        return True

    def on_failure(self) -> None:
        pass

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
