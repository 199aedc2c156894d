"""Tensors that cross Ray's object store as NumPy buffers.

Ray keeps NumPy arrays out of band when it pickles an object, so `ray.get` maps
them from the shared-memory store instead of copying; a torch tensor pickles
through its storage and is copied (about 30x slower for a 33 MB image
embedding). Objects that carry large tensors between actors (image embeddings:
vision encoder -> LLM replica -> TP workers) define `__reduce__` with these.
bf16/fp16 travel as int16 views (NumPy has no bfloat16). The rebuilt tensors
sit in read-only store memory: their users read them (index, copy, `.to`) and
never write.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `to_numpy`; `dtype` is the tensor's dtype name ("bfloat16", "float32", ...)."""
    with warnings.catch_warnings():  # read-only store memory (see the module docstring)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    dt = getattr(torch, dtype)
    return t.view(dt) if t.dtype != dt else t


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def reduce_optional(t: torch.Tensor | None) -> tuple[Any, str | None]:
    return (None, None) if t is None else (to_numpy(t), dtype_name(t))


def rebuild_optional(a: Any, dtype: str | None) -> torch.Tensor | None:
    return None if a is None else from_numpy(a, dtype)
