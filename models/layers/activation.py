"""Activations on the splitvl ops."""

from __future__ import annotations

import torch
from torch import nn

import ops


class SiluAndMul(nn.Module):
    """Shapes: x [..., 2d] -> [..., d] = silu(x[..., :d]) * x[..., d:]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluTanh(nn.Module):
    """Tanh-approximated gelu (HF `gelu_pytorch_tanh`). Shapes: x [...] -> same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh(x)


def get_act_and_mul(name: str) -> nn.Module:
    """Gated activation for `hidden_act` (the decoder MLP's gate/up product)."""
    if name == "silu":
        return SiluAndMul()
    raise ValueError(f"unsupported gated activation {name!r} (only 'silu')")
