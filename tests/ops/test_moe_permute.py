"""MoE unpadded permutation (`moe_permute`, the rows of a grouped GEMM) and the weighted
combine: kernels vs references, the reference vs a pair-by-pair construction; opcheck."""

from __future__ import annotations

import pytest
import torch

from ops import reference_moe
from tests.ops.common import DEVICE_DTYPES, DEVICES, assert_close, raises

# (tokens, k, experts): one token, odd sizes, more experts than pairs (empty experts), one
# expert, a prefill-sized routing (many chunks of the CUDA CTA), E = 1000 (over 48 KB of
# shared memory), no tokens.
ROUTING = [(1, 8, 128), (1, 1, 1), (5, 2, 7), (37, 4, 60), (300, 3, 5), (4096, 8, 128), (20, 4, 1000), (0, 2, 4)]


def _ids(tokens: int, k: int, experts: int, device: str) -> torch.Tensor:
    logits = torch.randn(tokens, experts)
    if experts > 2:
        logits[:, 1] = -float("inf")  # expert 1 gets no pair
    return torch.topk(logits, k, dim=-1).indices.to(device, torch.int32).contiguous()


def _pair_by_pair(ids: torch.Tensor, experts: int) -> tuple[list[int], list[list[int]], list[int]]:
    """(row tokens, pair rows, offsets) built one expert, then one pair, at a time."""
    tokens, k = ids.shape
    flat = ids.flatten().tolist()
    row_tokens, pos, offsets = [], [-1] * len(flat), []
    for e in range(experts):
        for p, owner in enumerate(flat):
            if owner == e:
                pos[p] = len(row_tokens)
                row_tokens.append(p // k)
        offsets.append(len(row_tokens))
    row_tokens += [0] * (len(flat) - len(row_tokens))
    return row_tokens, [pos[t * k : (t + 1) * k] for t in range(tokens)], offsets


@pytest.mark.parametrize("tokens,k,experts", [r for r in ROUTING if r[0] < 1000])
def test_reference_matches_pair_by_pair_construction(tokens, k, experts):
    ids = _ids(tokens, k, experts, "cpu")
    ids[::3, 0] = torch.where(torch.arange(ids[::3].shape[0]) % 2 == 0, -1, experts)  # dropped
    got = reference_moe.moe_permute(ids, experts)
    row_tokens, pos, offsets = _pair_by_pair(ids, experts)
    assert got.row_tokens.tolist() == row_tokens
    assert got.pair_pos.tolist() == pos
    assert got.expert_offsets.tolist() == offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,k,experts", ROUTING)
def test_moe_permute_matches_reference(kernels, device, tokens, k, experts):
    ids = _ids(tokens, k, experts, device)
    got = kernels.moe_permute(ids, experts)
    ref = reference_moe.moe_permute(ids, experts)
    for name in ("row_tokens", "pair_pos", "expert_offsets"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(ref, name).cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_permute_drops_out_of_range_experts(kernels, device):
    ids = torch.tensor([[0, 5], [2, -1], [2, 0]], dtype=torch.int32, device=device)
    got = kernels.moe_permute(ids, 3)
    assert got.pair_pos.cpu().tolist() == [[0, -1], [2, -1], [3, 1]]
    assert got.row_tokens.cpu().tolist() == [0, 2, 1, 2, 0, 0]
    assert got.expert_offsets.cpu().tolist() == [2, 2, 4]


@pytest.mark.parametrize("device", DEVICES)
def test_moe_permute_rejects_bad_offsets(kernels, device):
    ids = torch.zeros(3, 2, dtype=torch.int32, device=device)
    out = (torch.empty(6, dtype=torch.int32, device=device), torch.empty(3, 2, dtype=torch.int32, device=device),
           torch.empty(4, dtype=torch.int32, device=device))
    with raises(device, "expert_offsets"):
        torch.ops.splitvl.moe_permute.default(*out, ids, 5)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("hidden", [2048, 72, 100])
@pytest.mark.parametrize("k", [3, 10])
def test_moe_combine_weighted_matches_reference(kernels, device, dtype, hidden, k):
    """Router weights applied in the combine; k = 10 takes two groups of pair loads; dropped
    pairs; packed (2048, 72) and scalar (100) rows; y holds NaN in its unused rows."""
    ids = _ids(7, k, 20, device)
    ids[1, 2] = -1
    ids[4, k - 1] = 20
    permutation = kernels.moe_permute(ids, 20)
    y = torch.randn(ids.numel(), hidden, device=device).to(dtype)
    y[-2:] = float("nan")  # the two dropped pairs' rows: never read
    weights = torch.rand(7, k, device=device)
    out = kernels.moe_combine(y, permutation, weights)
    assert_close(out, reference_moe.moe_combine(y, permutation, weights), dtype)
    assert not out.isnan().any()
    rows = y.float()[permutation.pair_pos.clamp(min=0).long()]
    expected = (rows * (weights * (permutation.pair_pos >= 0))[..., None]).nan_to_num().sum(1)
    assert_close(out.float(), expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_permute_and_weighted_combine_opcheck(kernels, device):
    tokens, k, experts, hidden = 6, 2, 5, 16
    ids = _ids(tokens, k, experts, device)
    outs = (torch.empty(tokens * k, dtype=torch.int32, device=device),
            torch.empty(tokens, k, dtype=torch.int32, device=device),
            torch.empty(experts, dtype=torch.int32, device=device))
    torch.library.opcheck(torch.ops.splitvl.moe_permute.default, (*outs, ids, experts))
    permutation = kernels.moe_permute(ids, experts)
    y = torch.randn(tokens * k, hidden, device=device)
    out = torch.empty(tokens, hidden, device=device)
    weights = torch.rand(tokens, k, device=device)
    torch.library.opcheck(torch.ops.splitvl.moe_combine.default, (out, y, permutation.pair_pos, weights))
