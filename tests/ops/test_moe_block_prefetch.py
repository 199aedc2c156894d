"""moe_decode_block's L2 prefetch (SPLITVL_L2_PREFETCH: its down rows asked into L2 during its
gate_up phase, the gate_up rows read evict-first): a hint that must change no value."""

from __future__ import annotations

import pytest
import torch

import ops
from tests.ops.common import GPU


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


@GPU
@pytest.mark.parametrize("tokens", [1, 4])
def test_moe_decode_block_prefetch_changes_nothing_gpu(tokens):
    """The 30B-A3B block with its down rows prefetched and its gate_up rows evict-first: the same
    out and residual, bit for bit, as without, eagerly and graph-replayed."""
    torch.manual_seed(tokens)
    experts, k, hidden, inter = 128, 8, 2048, 768
    x, start = _randn(tokens, hidden), _randn(tokens, hidden)
    norm_weight = torch.rand(hidden, device="cuda").to(torch.bfloat16) + 0.5
    gate = _randn(experts, hidden, scale=4 / hidden**0.5)
    gate_up, down = _randn(experts, 2 * inter, hidden, scale=hidden**-0.5), _randn(experts, hidden, inter, scale=0.03)
    barrier = torch.zeros(1, dtype=torch.int32, device="cuda")

    def block(residual: torch.Tensor) -> torch.Tensor:
        out, _ = ops.moe_decode_block(x, residual, norm_weight, 1e-6, gate, gate_up, down, k, True, barrier)
        return out

    results = {}
    for enabled in (False, True):
        with ops.l2_prefetch(enabled):
            residual = start.clone()
            eager = block(residual)
            graph = torch.cuda.CUDAGraph()
            work = start.clone()
            with torch.cuda.graph(graph):
                out = block(work)
            work.copy_(start)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager) and torch.equal(work, residual)
            results[enabled] = (eager, residual)
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])
