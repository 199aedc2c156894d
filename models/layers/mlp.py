"""The SwiGLU MLP of the Qwen decoders (dense layers and the MoE shared expert)."""

from __future__ import annotations

import torch
from torch import nn

import ops
from models.layers.linear import MergedColumnParallelLinear, RowParallelLinear, streams_small_rows
from models.layers.parallel import ParallelContext


FUSED_GATE_UP_MAX_NUMEL = 1 << 24


class SwiGLUMLP(nn.Module):
    """`down_proj(silu(gate_proj(x)) * up_proj(x))`, gate/up fused into `gate_up_proj`.

    `reduce_results=False` leaves the TP partial sums for the caller to reduce
    (the MoE block adds its shared expert before one all-reduce).
    Shapes: x [T, H] -> [T, H].
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, parallel: ParallelContext | None, reduce_results: bool = True
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, parallel=parallel)
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, parallel=parallel, reduce_results=reduce_results
        )
        # The fused stream beats cuBLAS + silu_and_mul for small weights (0.8B: 6.9 vs 7.6 us) and
        # loses for large ones (8B: 56 vs 50 us, cuBLAS at 96% of copy): H200, BENCHMARKS.md section 9.
        self.fuse_small = self.gate_up_proj.weight.numel() <= FUSED_GATE_UP_MAX_NUMEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_small and streams_small_rows(x):  # decode: the activation fused into the gate_up stream
            return self.down_proj(ops.gate_up_silu_small(x, self.gate_up_proj.weight))
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
