"""Task selection and model construction from the architecture registry.

`architectures[0]` of config.json picks the `models/architectures.py` entry:
vision-language entries give the "vl" task, the others "llm". Model classes
are imported when built; a failed import names the architecture and the cause.
The language model a builder returns meets `models.interface.LanguageModel`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from models.architectures import ARCHITECTURES, Architecture
from models.config import ModelConfig, UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch

    from models.interface import LanguageModel
    from models.layers.parallel import ParallelContext

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


def architecture_of(config: ModelConfig) -> Architecture:
    """The registry entry of `config.architecture`."""
    arch = ARCHITECTURES.get(config.architecture)
    if arch is None:
        raise UnsupportedArchitectureError(config.architecture)
    return arch


def get_task(config: ModelConfig, disable_vision_encoder: bool = False) -> TaskSpec:
    """The task of a deployment of `config` (the seed's `get_task`)."""
    if not architecture_of(config).is_vl or config.vision is None:
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
    return import_model_class(config.architecture, architecture_of(config).language_model)


def vision_model_class(config: ModelConfig) -> type:
    arch = architecture_of(config)
    if arch.vision_model is None or config.vision is None:
        raise ValueError(f"{config.architecture} has no vision encoder")
    return import_model_class(config.architecture, arch.vision_model)


def build_language_model(
    config: ModelConfig, parallel: ParallelContext, dtype: torch.dtype, device: torch.device | str
) -> LanguageModel:
    """Instantiate the decoder of `config` for one TP rank (weights not loaded)."""
    return language_model_class(config)(config, parallel, dtype, device)


def build_vision_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> Any:
    """Instantiate the vision tower of `config` (replicated, no TP)."""
    return vision_model_class(config)(config.vision, dtype, device)
