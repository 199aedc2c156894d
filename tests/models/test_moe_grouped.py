"""The experts as two grouped GEMMs over pairs sorted without padding (`grouped_experts`)
== the moe_gemm kernels' chain == an fp32 per-token expert loop; which path a step takes; no host
sync on the GPU path. CPU tests run `torch._grouped_mm`'s CPU implementation directly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ops
from models.layers.moe import GROUPED_GEMM_MIN_TOKENS, FusedExperts
from tests.ops.common import assert_close

GPU = pytest.mark.gpu
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")


def _experts(experts: int, hidden: int, inter: int, device: str, dtype: torch.dtype) -> FusedExperts:
    with torch.device(device):
        module = FusedExperts(experts, hidden, inter)
    module.gate_up_proj.data = (torch.randn(experts, 2 * inter, hidden) / hidden**0.5).to(device, dtype)
    module.down_proj.data = (torch.randn(experts, hidden, inter) / inter**0.5).to(device, dtype)
    return module


def _routing(tokens: int, k: int, experts: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(tokens, experts)
    logits[:, 1] = -float("inf")  # an expert without rows
    logits[: tokens // 3, 0] = 30.0  # one expert with a third of the tokens
    weights, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return weights.to(device).contiguous(), ids.to(device, torch.int32).contiguous()


def _per_token(module: FusedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 expert loop, one expert at a time over its tokens (transformers' Qwen3-MoE loop)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gate_up, down = module.gate_up_proj.float(), module.down_proj.float()
    for e in range(module.num_experts):
        tokens, slot = torch.nonzero(ids == e, as_tuple=True)
        if tokens.numel():
            g, u = F.linear(x[tokens].float(), gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, tokens, F.linear(F.silu(g) * u, down[e]) * weights[tokens, slot, None])
    return out


def _both_paths(module: FusedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
    grouped = module(x, weights, ops.moe_permute(ids, module.num_experts))  # grouped_experts
    kernels = module(x, weights, ops.moe_align(ids, module.num_experts))
    return grouped, kernels


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,k,experts,hidden,inter", [(1, 1, 3, 16, 8), (37, 4, 9, 72, 40), (300, 8, 60, 64, 24)])
def test_grouped_experts_match_kernels_and_fp32_loop_on_cpu(dtype, tokens, k, experts, hidden, inter):
    module = _experts(experts, hidden, inter, "cpu", dtype)
    weights, ids = _routing(tokens, k, experts, "cpu")
    x = torch.randn(tokens, hidden).to(dtype)
    grouped, kernels = _both_paths(module, x, weights, ids)
    expected = _per_token(module, x, weights, ids)
    assert_close(grouped.float(), expected, dtype, scale=3)
    assert_close(kernels.float(), expected, dtype, scale=3)


def test_cpu_and_small_steps_keep_the_kernels():
    module = _experts(4, 16, 8, "cpu", torch.bfloat16)
    assert not module.uses_grouped_gemm(GROUPED_GEMM_MIN_TOKENS * 4)
    _, routing = module.route(torch.randn(GROUPED_GEMM_MIN_TOKENS, 4), 2, True)
    assert isinstance(routing, ops.MoeAlignment)


# The 30B-A3B expert shape (E=128, H=2048, I=768, top-8) at the threshold, an odd count, a prefill.
@GPU
@pytest.mark.parametrize("tokens", [512, 1000, 4096])
def test_grouped_path_matches_kernels_and_fp32_on_gpu(tokens):
    dtype = torch.bfloat16
    module = _experts(128, 2048, 768, "cuda", dtype)
    weights, ids = _routing(tokens, 8, 128, "cuda")
    x = torch.randn(tokens, 2048, device="cuda").to(dtype)
    grouped, kernels = _both_paths(module, x, weights, ids)
    expected = _per_token(module, x, weights, ids)
    assert_close(grouped.float(), expected, dtype, scale=3)
    assert_close(kernels.float(), expected, dtype, scale=3)
    assert_close(grouped, kernels, dtype, scale=3)


@GPU
def test_dispatch_picks_the_grouped_gemm_only_for_large_eager_bf16_steps():
    module = _experts(128, 2048, 768, "cuda", torch.bfloat16)
    logits = torch.randn(GROUPED_GEMM_MIN_TOKENS, 128, device="cuda")
    assert isinstance(module.route(logits, 8, True)[1], ops.MoePermutation)
    assert isinstance(module.route(logits[:-1], 8, True)[1], ops.MoeAlignment)
    for dtype in (torch.float32, torch.float16):  # fp16 would take torch's host-syncing fallback
        assert not _experts(8, 2048, 768, "cuda", dtype).uses_grouped_gemm(4096)
    assert not _experts(8, 100, 768, "cuda", torch.bfloat16).uses_grouped_gemm(4096)  # rows not 16-byte
    graph, captured = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        captured.append(module.uses_grouped_gemm(4096))
        torch.zeros(1, device="cuda").add_(1)  # the graph is not empty
    assert captured == [False]


@GPU
def test_grouped_path_does_not_sync_with_the_host():
    module = _experts(128, 2048, 768, "cuda", torch.bfloat16)
    x = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(1024, 128, device="cuda")
    module(x, *module.route(logits, 8, True))  # warm up (lazy init may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights, routing = module.route(logits, 8, True)
        assert isinstance(routing, ops.MoePermutation)
        module(x, weights, routing)
    finally:
        torch.cuda.set_sync_debug_mode("default")
