"""prefetch_l2 (a weight asked into the GPU's L2 ahead of its GEMV) and the L2-prefetch switch:
a hint that must change no value. On the CPU the op does nothing; on the GPU it launches a
kernel between two PDL kernels, so chains of dependent decode ops with prefetches interleaved
must give, bit for bit, what they give without them (eagerly without PDL: the reference), and
moe_decode_block must give the same bits with its down-row prefetch on and off."""

from __future__ import annotations

import pytest
import torch

import ops
from bench.pdl_bisect import run
from tests.ops.common import DEVICES, GPU

LINKS = 16


def _needs_extension() -> None:
    if not ops.extension_available():
        pytest.skip("no extension: the switch is a no-op")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int32])
@pytest.mark.parametrize("make", [
    lambda d, t: torch.arange(3 * 1000, device=d).to(t).view(3, 1000),  # 16-byte aligned, contiguous
    lambda d, t: torch.arange(3 * 1000, device=d).to(t).view(3, 1000)[:, 1:],  # strided: skipped
    lambda d, t: torch.arange(1001, device=d).to(t)[1:],  # unaligned start: skipped
    lambda d, t: torch.empty(0, 7, device=d, dtype=t),  # nothing to fetch
    lambda d, t: torch.arange(5, device=d).to(t),  # under 16 bytes
], ids=["contiguous", "strided", "unaligned", "empty", "tiny"])
def test_prefetch_changes_nothing(device, dtype, make):
    weight = make(device, dtype)
    before = weight.clone()
    for enabled in (True, False):
        with ops.l2_prefetch(enabled):
            assert ops.prefetch_l2(weight) is None
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(weight, before)


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_opcheck(kernels, device):
    torch.library.opcheck(torch.ops.splitvl.prefetch_l2.default, (torch.randn(64, 32, device=device),))


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


@GPU
@pytest.mark.parametrize("rows", [1, 3])
def test_prefetched_chain_equals_plain_gpu(rows):
    """A decode layer's order: the next weight asked for, then small kernels, then its GEMV. With
    the switch on (a prefetch kernel between each pair of kernels) under PDL, eagerly and graphed,
    the chain equals the one without prefetches; a prefetch kernel that let the next kernel past
    the one before it would show here."""
    torch.manual_seed(0)
    h, inter = 2048, 1536
    w_in, w_gu = _randn(h, h, scale=h**-0.5), _randn(2 * inter, h, scale=h**-0.5)
    w_down = _randn(h, inter, scale=inter**-0.5)
    n1, n2 = torch.rand(h, device="cuda") + 0.5, torch.rand(h, device="cuda") + 0.5
    residual = _randn(rows, h)
    state = {}

    def link(i: int) -> torch.Tensor:
        x = state["x"]
        ops.prefetch_l2(w_in)
        y = ops.linear_small(ops.rms_norm(x, n1, 1e-6), w_in, None)
        ops.prefetch_l2(w_gu)
        ops.fused_add_rms_norm(y, residual, n2, 1e-6)
        ops.prefetch_l2(w_down)
        state["x"] = ops.linear_small(ops.gate_up_silu_small(y, w_gu), w_down, None)
        return state["x"]

    def chain(prefetch: bool, pdl: bool, graph: bool) -> list[torch.Tensor]:
        state["x"] = x0
        with ops.l2_prefetch(prefetch):
            return run(link, [residual], LINKS, pdl, graph)

    x0 = _randn(rows, h)
    want = chain(False, False, False)
    assert len({float(o.float().abs().sum()) for o in want[:LINKS]}) > LINKS // 2, "the data must change"
    for pdl, graph in ((True, False), (True, True), (False, True)):
        got = chain(True, pdl, graph)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"pdl={pdl} graph={graph}: tensor {i} differs from the chain without prefetches"


@GPU
@pytest.mark.parametrize("tokens", [1, 4])
def test_moe_decode_block_prefetch_changes_nothing_gpu(tokens):
    """The 30B-A3B block with its down rows prefetched and its gate_up rows evict-first: the same
    out and residual, bit for bit, as without, eagerly and graph-replayed."""
    _needs_extension()
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
