"""RMSNorm on the splitvl ops: Qwen3's (weight in the model dtype) and Qwen3.5's (`1 + w`, fp32)."""

from __future__ import annotations

import torch
from torch import nn

import ops
from models.layers.moe import PendingCombine


class RMSNorm(nn.Module):
    """`forward(x)` -> rms_norm(x); `forward(x, residual)` -> (rms_norm(x + residual), x + residual).

    The residual form runs `ops.fused_add_rms_norm` in place on `x` and
    `residual` (both must be tensors the caller owns); with a MoE block's pending
    combine for `x`, `ops.moe_combine_add_rms_norm` sums it into `residual` in the
    same kernel. Shapes: x [..., D].
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor | PendingCombine, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        if isinstance(x, PendingCombine):
            return ops.moe_combine_add_rms_norm(x.rows, x.alignment, None, residual, self.weight, self.eps)
        ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class OffsetRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint weight `w` scales by `1 + w` (Qwen3.5's zero-centered norm).

    transformers' `Qwen3_5RMSNorm` computes `(norm(x.float()) * (1 + w.float())).to(x.dtype)`:
    the scale is applied in fp32 and the result rounded once. The parameter here holds
    `1 + w` in fp32 (added once at load; rounding it to bf16 would rescale every channel by
    up to 0.4%), and the norm ops take an fp32 weight with a bf16/fp16 input with exactly
    those semantics, so every call is one kernel.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32), requires_grad=False)
        self.weight.weight_loader = self._load_offset

    @staticmethod
    def _load_offset(param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        if loaded.shape != param.shape:
            raise ValueError(f"tensor of shape {list(loaded.shape)} does not fit parameter {list(param.shape)}")
        param.data.copy_(loaded.float() + 1.0)
