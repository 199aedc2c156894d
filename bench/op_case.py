"""One timed op of bench/ops.py and the helpers its families build it with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Case:
    op: str
    shape: str
    run: Callable[[], object]  # the timed call
    check: Callable[[], float]  # relative max error vs the reference (runs once)
    bytes: int  # bytes the op must move (read + write)
    flops: int = 0  # rows timed against the matmul rate only


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff / max(1.0, expected.float().abs().max().item())


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
