"""Fused MoE decode ops: moe_gate_route vs the router linear + moe_route reference, and
moe_combine_add_rms_norm vs moe_combine -> fused_add_rms_norm (bit for bit on CPU); opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops import reference, reference_moe
from tests.ops.common import DEVICE_DTYPES, DEVICES, assert_close

# (tokens, experts, hidden, k): the 30B-A3B router at T 1 and 16, odd E/H/k, H not a multiple
# of a 16-byte pack, T > 16 and E > 512 (the linear + moe_route path), no tokens.
GATE = [(1, 128, 2048, 8), (16, 128, 328, 8), (3, 60, 100, 4), (5, 7, 33, 7), (17, 64, 64, 2),
        (4, 600, 64, 4), (0, 8, 16, 2)]


def _router(tokens: int, experts: int, hidden: int, device: str, dtype: torch.dtype, stride_pad: int):
    """x [T, H] (a column slice of a wider tensor when stride_pad > 0) and gate_weight [E, H]."""
    wide = torch.randn(tokens, hidden + stride_pad).to(device, dtype)
    x = wide[:, stride_pad:]
    weight = (4 * torch.randn(experts, hidden) / hidden**0.5).to(device, dtype)
    return x, weight


def _clear_tokens(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens whose k + 1 largest logits are apart by more than any fp32 summation order moves them."""
    logits = F.linear(x.double().cpu(), weight.double().cpu())
    top = torch.topk(logits, min(k + 1, logits.shape[1]), dim=-1).values
    gaps = (top[:, :-1] - top[:, 1:]).min(dim=-1).values if top.shape[1] > 1 else torch.ones(len(top))
    scale = logits.abs().amax() if logits.numel() else torch.tensor(1.0)
    return gaps > 1e-4 * scale.clamp(min=1)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens,experts,hidden,k", GATE)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("stride_pad", [0, 8, 3])
def test_moe_gate_route_matches_reference(kernels, device, dtype, tokens, experts, hidden, k, renormalize, stride_pad):
    x, weight = _router(tokens, experts, hidden, device, dtype, stride_pad)
    arrivals = torch.zeros(1, dtype=torch.int32, device=device)
    for _ in range(2):  # a second call finds the counter reset
        weights, ids, got = kernels.moe_gate_route(x, weight, k, renormalize, arrivals)
        assert arrivals.item() == 0
    w_ref, ids_ref, _ = reference_moe.moe_gate_route(x, weight, k, renormalize, arrivals)
    clear = _clear_tokens(x, weight, k)
    assert clear.sum() >= tokens // 2
    torch.testing.assert_close(ids.cpu()[clear], ids_ref.cpu()[clear], rtol=0, atol=0)
    torch.testing.assert_close(weights.cpu()[clear], w_ref.cpu()[clear], rtol=1e-4, atol=1e-6)
    ref = reference_moe.moe_align(ids, experts)  # the alignment of the ids the kernel picked
    assert got.block_size == ref.block_size and got.capacity == ref.capacity
    for name in ("sorted_pairs", "pair_pos", "block_experts", "total_padded"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(ref, name).cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_gate_route_opcheck(kernels, device):
    x, weight = _router(3, 60, 100, device, torch.float32, 0)
    align = kernels.moe_align(torch.zeros(3, 4, dtype=torch.int32, device=device), 60)
    out = (torch.empty(3, 4, device=device), torch.empty(3, 4, dtype=torch.int32, device=device),
           align.sorted_pairs, align.pair_pos, align.block_experts, align.total_padded,
           torch.empty(3, 60, device=device), torch.zeros(1, dtype=torch.int32, device=device))
    torch.library.opcheck(torch.ops.splitvl.moe_gate_route.default, (*out, x, weight, True))


# (tokens, k, experts, hidden): the 30B-A3B shape at T 1 and 16, odd H (no 16-byte packs), none.
COMBINE = [(1, 8, 128, 2048), (16, 8, 128, 328), (5, 2, 7, 100), (3, 4, 60, 769), (0, 2, 4, 64)]


def _combine_inputs(tokens, k, experts, hidden, device, dtype, norm_fp32: bool):
    ids = torch.argsort(torch.rand(tokens, experts), dim=-1)[:, :k]  # k distinct experts per token
    if tokens > 1:
        ids[1, 0] = -1  # a dropped pair
    alignment = reference_moe.moe_align(ids.to(device, torch.int32).contiguous(), experts)
    y = torch.randn(alignment.capacity, hidden).to(device, dtype)
    topk_weights = torch.rand(tokens, k, device=device)
    residual = torch.randn(tokens, 2 * hidden).to(device, dtype)[:, hidden:]  # a strided view
    norm_weight = (1 + torch.randn(hidden) / 4).to(device, torch.float32 if norm_fp32 else dtype)
    return y, alignment, topk_weights, residual, norm_weight


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens,k,experts,hidden", COMBINE)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("norm_fp32", [True, False])
def test_moe_combine_add_rms_norm_matches_two_ops(kernels, device, dtype, tokens, k, experts, hidden, weighted, norm_fp32):
    y, alignment, topk_weights, residual, norm_weight = _combine_inputs(tokens, k, experts, hidden, device, dtype, norm_fp32)
    w = topk_weights if weighted else None
    eps = 1e-6
    res_ref = residual.clone()
    normed_ref, _ = reference_moe.moe_combine_add_rms_norm(y, alignment, w, res_ref, norm_weight, eps)
    res_chain = residual.clone()
    normed_chain = kernels.moe_combine(y, alignment, w)
    kernels.fused_add_rms_norm(normed_chain, res_chain, norm_weight, eps)
    normed, res = kernels.moe_combine_add_rms_norm(y, alignment, w, residual, norm_weight, eps)
    assert res is residual
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {}
    if device == "cpu":
        torch.testing.assert_close(res, res_chain, **exact)
        torch.testing.assert_close(normed, normed_chain, **exact)
    else:
        assert_close(res, res_chain, dtype)
        assert_close(normed, normed_chain, dtype)
    assert_close(res, res_ref, dtype)
    assert_close(normed, normed_ref, dtype, scale=2)


def test_reference_combine_add_rms_norm_is_the_two_references():
    y, alignment, topk_weights, residual, norm_weight = _combine_inputs(4, 3, 9, 40, "cpu", torch.bfloat16, False)
    res_a, res_b = residual.clone(), residual.clone()
    normed, _ = reference_moe.moe_combine_add_rms_norm(y, alignment, topk_weights, res_a, norm_weight, 1e-5)
    combined = reference_moe.moe_combine(y, alignment, topk_weights)
    reference.fused_add_rms_norm(combined, res_b, norm_weight, 1e-5)
    torch.testing.assert_close(res_a, res_b, rtol=0, atol=0)
    torch.testing.assert_close(normed, combined, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_combine_add_rms_norm_opcheck(kernels, device):
    y, alignment, topk_weights, residual, norm_weight = _combine_inputs(3, 2, 7, 64, device, torch.float32, False)
    out = torch.empty(3, 64, device=device)
    residual = residual.contiguous()
    torch.library.opcheck(
        torch.ops.splitvl.moe_combine_add_rms_norm.default,
        (out, residual, y, alignment.pair_pos, topk_weights, norm_weight, 1e-6),
    )
