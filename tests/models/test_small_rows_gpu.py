"""GPU-only: the decoder linears at decode rows (<= SMALL_ROWS: ops.linear_small and
ops.gate_up_silu_small) equal the F.linear path they replace, run on the same rows inside a
batch too large for it (bf16, Qwen3.5-0.8B sizes)."""

from __future__ import annotations

import pytest
import torch

from models.layers.linear import (
    SMALL_ROWS, ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
    STREAMS_WIDE, RowParallelLinear, streams_small_rows,
)
from models.layers.mlp import SwiGLUMLP
from tests.ops.common import assert_close

pytestmark = pytest.mark.gpu
HIDDEN, INTER = 1024, 3584


def _layers() -> dict[str, torch.nn.Module]:
    with torch.device("cuda"):
        layers = {
            "qkv": QKVParallelLinear(HIDDEN, 256, 16, 2),
            "gdn_in_proj": MergedColumnParallelLinear(HIDDEN, [2048, 2048, 2048, 2048, 16, 16]),
            "o_proj": RowParallelLinear(2048, HIDDEN),
            "column_bias": ColumnParallelLinear(HIDDEN, 328, bias=True),
            "router": ReplicatedLinear(HIDDEN, 128),
            "mlp": SwiGLUMLP(HIDDEN, INTER, None),
        }
    for layer in layers.values():
        for p in layer.parameters():
            p.data.normal_(0, 0.02)
    return {name: layer.to(torch.bfloat16) for name, layer in layers.items()}


@pytest.mark.parametrize("rows", [1, 5, SMALL_ROWS])
def test_small_rows_equal_the_cublas_path(rows: int) -> None:
    torch.manual_seed(0)
    for name, layer in _layers().items():
        width = layer.gate_up_proj.input_size if name == "mlp" else layer.input_size_per_partition
        batch = torch.randn(SMALL_ROWS + 7, width, device="cuda", dtype=torch.bfloat16)
        assert streams_small_rows(batch[:rows]) and not streams_small_rows(batch)
        streams = layer.fuse_small if name == "mlp" else layer.streams_small
        assert streams == (STREAMS_WIDE or name not in ("qkv", "gdn_in_proj")), name  # the N <= K rule
        with torch.no_grad():
            small, large = layer(batch[:rows]), layer(batch)[:rows]
        assert_close(small.float(), large.float(), torch.bfloat16)
