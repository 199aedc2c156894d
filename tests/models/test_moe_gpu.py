"""GPU-only: the MoE block at Qwen3-VL-30B-A3B / Qwen3.5-MoE expert shapes in bf16 (tensor-core
kernels) equals transformers' block, and replays from a CUDA graph exactly as it runs eagerly."""

from __future__ import annotations

import pytest
import torch

from models.layers.moe import SparseMoeBlock

pytestmark = pytest.mark.gpu

HIDDEN, INTER, EXPERTS, TOP_K, SHARED = 2048, 768, 128, 8, 512
DEVICE, DTYPE = "cuda", torch.bfloat16


def _blocks(shared: bool) -> tuple[torch.nn.Module, SparseMoeBlock]:
    """transformers' block with random weights (std 0.02, as its init) and ours holding the same."""
    torch.manual_seed(0)
    if shared:
        from transformers import Qwen3_5MoeTextConfig
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

        cfg = Qwen3_5MoeTextConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS,
                                   num_experts_per_tok=TOP_K, shared_expert_intermediate_size=SHARED)
        ref = Qwen3_5MoeSparseMoeBlock(cfg)
    else:
        from transformers import Qwen3VLMoeTextConfig
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

        cfg = Qwen3VLMoeTextConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS,
                                   num_experts_per_tok=TOP_K)
        ref = Qwen3VLMoeTextSparseMoeBlock(cfg)
    for p in ref.parameters():
        p.data.normal_(0, 0.02)
    with torch.device(DEVICE):
        ours = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K, norm_topk_prob=True,
                              shared_expert_intermediate_size=SHARED if shared else 0)
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
        ours.experts.down_proj.copy_(ref.experts.down_proj)
        if shared:
            se = ref.shared_expert
            ours.shared_expert.gate_up_proj.weight.copy_(torch.cat([se.gate_proj.weight, se.up_proj.weight]))
            ours.shared_expert.down_proj.weight.copy_(se.down_proj.weight)
            ours.shared_expert_gate.weight.copy_(ref.shared_expert_gate.weight)
    return ref.to(DEVICE, DTYPE).eval(), ours.to(DTYPE).eval()


@pytest.mark.parametrize("shared", [False, True], ids=["qwen3_vl_moe", "qwen3_5_moe"])
@pytest.mark.parametrize("tokens", [1, 64, 700])
def test_moe_block_bf16_matches_transformers(shared: bool, tokens: int) -> None:
    ref, ours = _blocks(shared)
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        expected = ref(x[None])
        expected = (expected[0] if isinstance(expected, tuple) else expected)[0].float()
        got = ours(x).float()
    err = (got - expected).abs().max() / expected.abs().max()
    assert err < 3e-2, f"relative max error {err:.3e}"


def test_moe_block_cuda_graph_equals_eager() -> None:
    _, ours = _blocks(shared=True)
    x = torch.randn(16, HIDDEN, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        ours(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ours(x)
        x.copy_(torch.randn_like(x))  # new tokens, new routing, same graph
        graph.replay()
        torch.testing.assert_close(captured, ours(x), rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 4, 8])
def test_moe_decode_block_bf16_matches_transformers(tokens: int) -> None:
    """`forward_block` (ops.moe_decode_block: the post-attention add + norm and the block, one
    launch) == transformers' RMSNorm of x + residual, then its block."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRMSNorm

    from models.layers.layernorm import RMSNorm

    ref, ours = _blocks(shared=False)
    ref_norm = Qwen3VLMoeTextRMSNorm(HIDDEN, eps=1e-6).to(DEVICE, DTYPE)
    norm = RMSNorm(HIDDEN, eps=1e-6).to(DEVICE, DTYPE)
    with torch.no_grad():
        ref_norm.weight.copy_(1 + torch.randn(HIDDEN, device=DEVICE) / 8)
        norm.weight.copy_(ref_norm.weight)
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE)
    residual = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        summed = x + residual
        expected = ref(ref_norm(summed)[None])
        expected = (expected[0] if isinstance(expected, tuple) else expected)[0].float()
        ours.block_kernel = True
        assert ours.takes_block(x)
        got, res = ours.forward_block(x, residual, norm)
    torch.testing.assert_close(res, summed, rtol=0, atol=0)
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err < 3e-2, f"relative max error {err:.3e}"
