"""Architecture -> task and model classes.

`architectures[0]` of config.json decides everything: the four Qwen3-VL / Qwen3.5
conditional-generation architectures are vision-language ("vl"); the plain
causal-LM ones are text-only ("llm"). Model classes are named by import path
and imported only when built, so a dependency that only Qwen3.5 needs cannot
break serving Qwen3-VL; a failed import names the architecture and the cause.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from models.config import ModelConfig, UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch

    from models.layers.parallel import ParallelContext

_QWEN3_LM = "models.qwen3:Qwen3ForCausalLM"
_QWEN3_5_LM = "models.qwen3_5:Qwen3_5ForCausalLM"
_VISION = "models.qwen3_vl.vision:Qwen3VLVisionModel"


@dataclass(frozen=True, slots=True)
class ArchitectureEntry:
    """Where the classes of one HF architecture live (`module:Class`)."""

    language_model: str
    vision_model: str | None


ARCHITECTURES: MappingProxyType[str, ArchitectureEntry] = MappingProxyType(
    {
        "Qwen3VLForConditionalGeneration": ArchitectureEntry(_QWEN3_LM, _VISION),
        "Qwen3VLMoeForConditionalGeneration": ArchitectureEntry(_QWEN3_LM, _VISION),
        "Qwen3_5ForConditionalGeneration": ArchitectureEntry(_QWEN3_5_LM, _VISION),
        "Qwen3_5MoeForConditionalGeneration": ArchitectureEntry(_QWEN3_5_LM, _VISION),
        "Qwen3ForCausalLM": ArchitectureEntry(_QWEN3_LM, None),
        "Qwen3MoeForCausalLM": ArchitectureEntry(_QWEN3_LM, None),
    }
)

VISION_DISABLED_REASON = (
    "this deployment runs the language model only (disable_vision_encoder / "
    "language_model_only); image inputs are rejected"
)


class ModelImportError(ImportError):
    """The code for an architecture could not be imported."""

    def __init__(self, architecture: str, path: str, cause: BaseException):
        self.architecture = architecture
        super().__init__(
            f"cannot load the model code for {architecture} ({path}): "
            f"{type(cause).__name__}: {cause}"
        )


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a deployment of this model does.

    task: "vl" (image + text) or "llm" (text only).
    accepts_images: False means requests with images must be rejected (400),
        never served with the images dropped.
    reason: why images are not accepted (for the error message), else None.
    """

    task: Literal["vl", "llm"]
    accepts_images: bool
    reason: str | None = None


def _entry(config: ModelConfig) -> ArchitectureEntry:
    entry = ARCHITECTURES.get(config.architecture)
    if entry is None:
        raise UnsupportedArchitectureError(config.architecture)
    return entry


def get_task(config: ModelConfig, disable_vision_encoder: bool = False) -> TaskSpec:
    """The task of a deployment of `config` (the seed's `get_task`)."""
    entry = _entry(config)
    if entry.vision_model is None or config.vision is None:
        return TaskSpec("llm", False, f"{config.architecture} is a text-only model")
    if disable_vision_encoder:
        return TaskSpec("llm", False, VISION_DISABLED_REASON)
    return TaskSpec("vl", True, None)


def import_model_class(architecture: str, path: str) -> type:
    """Import `module:Class`; any failure becomes a ModelImportError naming the arch."""
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError, OSError, RuntimeError) as exc:
        raise ModelImportError(architecture, path, exc) from exc


def language_model_class(config: ModelConfig) -> type:
    return import_model_class(config.architecture, _entry(config).language_model)


def vision_model_class(config: ModelConfig) -> type:
    entry = _entry(config)
    if entry.vision_model is None or config.vision is None:
        raise ValueError(f"{config.architecture} has no vision encoder")
    return import_model_class(config.architecture, entry.vision_model)


def check_dependencies(config: ModelConfig, disable_vision_encoder: bool = False) -> None:
    """Import every class a deployment of `config` needs; fail fast at startup."""
    language_model_class(config)
    if get_task(config, disable_vision_encoder).task == "vl":
        vision_model_class(config)


def build_language_model(
    config: ModelConfig, parallel: ParallelContext, dtype: torch.dtype, device: torch.device | str
) -> Any:
    """Instantiate the decoder of `config` for one TP rank (weights not loaded)."""
    return language_model_class(config)(config, parallel, dtype, device)


def build_vision_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> Any:
    """Instantiate the vision tower of `config` (replicated, no TP)."""
    return vision_model_class(config)(config.vision, dtype, device)
