"""Activations on the splitvl ops."""

from __future__ import annotations

import torch
from torch import nn

import ops


class GeluTanh(nn.Module):
    """Tanh-approximated gelu (HF `gelu_pytorch_tanh`). Shapes: x [...] -> same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh(x)
