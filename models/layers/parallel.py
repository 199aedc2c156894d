"""Tensor-parallel context and the collectives the layers use.

The context is passed down explicitly to every layer (no module globals), so
several replicas (or tests) can live in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """Which tensor-parallel rank this module instance is, out of how many.

    `group` is the torch.distributed process group of the TP ranks
    (None = the default group). With `tp_size == 1` no collective is called.
    `custom_ar`: a `models.layers.custom_allreduce.CustomAllReduce` over the
    same ranks, used by `all_reduce` for the rows it fits (None: NCCL/gloo only).
    """

    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None
    custom_ar: Any = None

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")


SINGLE = ParallelContext()


def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum `x` over the TP ranks (in place when distributed). Returns `x`."""
    if ctx.tp_size == 1:
        return x
    if ctx.custom_ar is not None and ctx.custom_ar.fits(x):
        return ctx.custom_ar.all_reduce_(x)
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=ctx.group)
    return x


def all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` in rank order."""
    if ctx.tp_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, x, group=ctx.group)
    return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int) -> int:
    """Exact division; a size that does not split evenly over the TP ranks is a config error."""
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by tp_size {denominator}")
    return numerator // denominator
