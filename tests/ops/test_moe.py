"""topk_softmax: kernels vs reference, reference vs transformers' Qwen3-MoE router math."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.common import raises, DEVICES

DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device,dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,topk", [(0, 8, 2), (1, 8, 1), (37, 60, 4), (13, 128, 8), (5, 7, 7)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax(kernels, device, dtype, tokens, experts, topk, renormalize):
    gating = torch.randn(tokens, experts, device=device).to(dtype)
    weights, ids = kernels.topk_softmax(gating, topk, renormalize)
    w_ref, ids_ref = reference.topk_softmax(gating, topk, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (tokens, topk)
    torch.testing.assert_close(ids.cpu(), ids_ref.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(weights.cpu(), w_ref.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_ties_pick_lower_index(kernels, device):
    gating = torch.zeros(3, 16, device=device)
    gating[1, 5] = gating[1, 9] = 2.0
    weights, ids = kernels.topk_softmax(gating, 4, True)
    assert ids.tolist()[0] == [0, 1, 2, 3]
    assert ids.tolist()[1] == [5, 9, 0, 1]
    torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_strided_gating(kernels, device):
    logits = torch.randn(9, 100, device=device)
    gating = logits[:, 10:74]  # router columns of a wider projection
    weights, ids = kernels.topk_softmax(gating, 6, True)
    w_ref, ids_ref = reference.topk_softmax(gating, 6, True)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(weights, w_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_rejects_bad_k(kernels, device):
    with raises(device, "k="):
        kernels.topk_softmax(torch.randn(2, 4, device=device), 5, True)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_opcheck(kernels, device):
    gating = torch.randn(6, 32, device=device)
    w = torch.empty(6, 4, device=device)
    ids = torch.empty(6, 4, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.splitvl.topk_softmax.default, (w, ids, gating, True))


@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_matches_qwen3_moe_router_math(renormalize):
    """The router in transformers' Qwen3-MoE block: softmax, topk, optional norm_topk_prob."""
    logits = torch.randn(11, 60)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    w_hf, ids_hf = torch.topk(probs, 4, dim=-1)
    if renormalize:
        w_hf = w_hf / w_hf.sum(dim=-1, keepdim=True)
    w, ids = reference.topk_softmax(logits, 4, renormalize)
    torch.testing.assert_close(ids.long(), ids_hf, rtol=0, atol=0)
    torch.testing.assert_close(w, w_hf)
