"""MoE expert ops: alignment, grouped gate_up/down GEMMs and combine, kernels vs references;
the chain vs a per-token transformers-style expert loop; opcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ops import reference_moe
from ops.reference_moe import align_block_size, align_capacity
from tests.ops.common import DEVICE_DTYPES, DEVICES, GPU, assert_close, assert_graph_replay_equals_eager, raises

# (tokens, k, experts): decode, odd sizes, an expert-heavy prefill (block 64 and 128), empty.
ROUTING = [(1, 8, 128), (5, 2, 7), (37, 4, 60), (64, 8, 16), (300, 4, 8), (0, 2, 4)]


def _routing(tokens: int, k: int, experts: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(tokens, experts)
    weights, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return weights.to(device).contiguous(), ids.to(device, torch.int32).contiguous()


def _real_rows(alignment) -> torch.Tensor:
    pos = alignment.pair_pos.flatten().long()
    return pos[pos >= 0]


def test_block_size_grows_with_pairs_per_expert():
    assert align_block_size(8, 128) == 16 and align_block_size(2048, 128) == 16
    assert align_block_size(2049, 128) == 64 and align_block_size(8191, 128) == 64
    assert align_block_size(8192, 128) == 128 and align_block_size(32768, 128) == 128


@pytest.mark.parametrize("tokens,k,experts", [(1, 8, 128), (3, 2, 2), (100, 4, 7), (40, 2, 128)])
def test_capacity_bounds_the_worst_routings(tokens, k, experts):
    """Every expert hit once but one (most padding), all on one expert, round-robin."""
    pairs = tokens * k
    hit = min(pairs, experts)
    spread = torch.arange(pairs) % experts
    lopsided = torch.where(torch.arange(pairs) < hit, torch.arange(pairs), 0)
    for flat in (spread, lopsided, torch.zeros(pairs, dtype=torch.long)):
        alignment = reference_moe.moe_align(flat.view(tokens, k).to(torch.int32), experts)
        assert 0 < alignment.total_padded.item() <= alignment.capacity
        assert alignment.capacity == align_capacity(pairs, experts, align_block_size(pairs, experts))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,k,experts", ROUTING)
def test_moe_align_matches_reference(kernels, device, tokens, k, experts):
    _, ids = _routing(tokens, k, experts, device)
    got = kernels.moe_align(ids, experts)
    ref = reference_moe.moe_align(ids, experts)
    assert got.block_size == ref.block_size and got.capacity == ref.capacity
    for name in ("sorted_pairs", "pair_pos", "block_experts", "total_padded"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(ref, name).cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_align_drops_out_of_range_experts(kernels, device):
    # Expert ids a rank does not own (expert parallelism) must route nowhere.
    ids = torch.tensor([[0, 5], [2, -1], [2, 0]], dtype=torch.int32, device=device)
    got = kernels.moe_align(ids, 3)
    assert got.pair_pos.cpu().tolist() == [[0, -1], [16, -1], [17, 1]]
    assert got.total_padded.item() == 32
    assert got.block_experts.cpu().tolist()[:2] == [0, 2]


# (tokens, experts, k): one launch (T <= 32 tokens and E <= 512; E = 512 opts in to more
# than 48 KB of shared memory), and two launches (T = 33, 64; E = 1000); no tokens.
ROUTE = [(1, 128, 8), (3, 60, 2), (32, 7, 1), (5, 512, 10), (33, 128, 8), (64, 128, 8), (20, 1000, 4), (0, 8, 2)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens,experts,k", ROUTE)
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_route_matches_topk_then_align(kernels, device, dtype, tokens, experts, k, renormalize):
    gating = torch.randn(tokens, experts, device=device).to(dtype)
    weights, ids, got = kernels.moe_route(gating, k, renormalize)
    w_ref, ids_ref, ref = reference_moe.moe_route(gating, k, renormalize)
    torch.testing.assert_close(ids.cpu(), ids_ref.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(weights.cpu(), w_ref.cpu(), rtol=1e-5, atol=1e-6)
    assert got.block_size == ref.block_size and got.capacity == ref.capacity
    for name in ("sorted_pairs", "pair_pos", "block_experts", "total_padded"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(ref, name).cpu(), rtol=0, atol=0)


def _weights(experts: int, hidden: int, inter: int, device: str, dtype: torch.dtype):
    gate_up = (torch.randn(experts, 2 * inter, hidden) / hidden**0.5).to(device, dtype)
    down = (torch.randn(experts, hidden, inter) / inter**0.5).to(device, dtype)
    return gate_up, down


# (hidden, inter): tensor-core path with N and K tails (328, 88), and K % 8 != 0 (CUDA-core path).
SHAPES = [(328, 88), (100, 36), (64, 32)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens,k,experts", ROUTING)
@pytest.mark.parametrize("hidden,inter", SHAPES)
def test_moe_experts_match_reference(kernels, device, dtype, tokens, k, experts, hidden, inter):
    weights, ids = _routing(tokens, k, experts, device)
    gate_up, down = _weights(experts, hidden, inter, device, dtype)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    alignment = kernels.moe_align(ids, experts)
    rows = _real_rows(alignment).to(device)
    h = kernels.moe_gate_up(x, gate_up, alignment)
    h_ref = reference_moe.moe_gate_up(x, gate_up, alignment)
    assert_close(h[rows], h_ref[rows], dtype, scale=2)
    y = kernels.moe_down(h_ref, down, weights, alignment)
    y_ref = reference_moe.moe_down(h_ref, down, weights, alignment)
    assert_close(y[rows], y_ref[rows], dtype, scale=2)
    out = kernels.moe_combine(y_ref, alignment)
    assert_close(out, reference_moe.moe_combine(y_ref, alignment), dtype)


# Routings aligned in 16-row blocks (few pairs per expert: the CUDA decode path): one token,
# odd token counts, E not a multiple of the block, k 1/2/8, and (64, 2, 16) with one expert
# forced to 40 pairs (three blocks of one expert).
SMALL_BLOCK_ROUTING = [(1, 8, 128), (1, 1, 7), (3, 2, 60), (64, 8, 128), (65, 8, 128), (64, 2, 16)]
# (hidden, inter): the 30B-A3B expert at TP=4 (768 / 4), a K tail of 8 and an N tail (328, 88),
# and I a multiple of 8 but not of 16 or 32 (TP-sharded odd intermediates).
SMALL_BLOCK_SHAPES = [(2048, 192), (328, 88), (136, 40)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens,k,experts", SMALL_BLOCK_ROUTING)
@pytest.mark.parametrize("hidden,inter", SMALL_BLOCK_SHAPES)
def test_moe_experts_small_blocks_match_reference(kernels, device, dtype, tokens, k, experts, hidden, inter):
    assert align_block_size(tokens * k, experts) == 16
    weights, ids = _routing(tokens, k, experts, device)
    if experts == 16:
        ids[:40, 0] = 0
        ids[:40, 1] = torch.where(ids[:40, 1] == 0, 1, ids[:40, 1])
    gate_up, down = _weights(experts, hidden, inter, device, dtype)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    alignment = kernels.moe_align(ids, experts)
    rows = _real_rows(alignment).to(device)
    h = kernels.moe_gate_up(x, gate_up, alignment)
    assert_close(h[rows], reference_moe.moe_gate_up(x, gate_up, alignment)[rows], dtype, scale=2)
    y = kernels.moe_down(h, down, weights, alignment)
    assert_close(y[rows], reference_moe.moe_down(h, down, weights, alignment)[rows], dtype, scale=2)


# Routings aligned in 64- and 128-row blocks (the CUDA prefill tile), T a multiple of nothing:
# (45, 2, 3) 30 pairs per expert (block 64), (203, 8, 11) and (130, 6, 8) more than 64 (block 128).
LARGE_BLOCK_ROUTING = [(45, 2, 3), (203, 8, 11), (130, 6, 8)]
# (hidden, inter): N and K tails of the 128-row weight tile and the 64-wide K step (328, 88),
# I a multiple of 8 but not of 16 (136, 40), and an odd I (72, 45: gate_up's single-column
# stores; down's K = 45 takes the CUDA-core path).
LARGE_BLOCK_SHAPES = [(328, 88), (136, 40), (72, 45)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens,k,experts", LARGE_BLOCK_ROUTING)
@pytest.mark.parametrize("hidden,inter", LARGE_BLOCK_SHAPES)
def test_moe_experts_large_blocks_match_reference(kernels, device, dtype, tokens, k, experts, hidden, inter):
    assert align_block_size(tokens * k, experts) in (64, 128)
    weights, ids = _skewed_routing(tokens, k, experts, device)
    alignment = kernels.moe_align(ids, experts)
    assert alignment.block_size == align_block_size(tokens * k, experts)
    _check_gemms(kernels, alignment, weights, experts, hidden, inter, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_moe_experts_every_block_size_match_reference(kernels, device, dtype, block_size):
    """One skewed routing (T = 77) aligned in each block size the CUDA GEMMs have a tile for:
    the alignment equals the reference's, the GEMMs match theirs over it."""
    tokens, k, experts = 77, 4, 9
    weights, ids = _skewed_routing(tokens, k, experts, device)
    got = kernels.moe_align(ids, experts, block_size)
    ref = reference_moe.moe_align(ids, experts, block_size)
    assert got.block_size == ref.block_size == block_size and got.capacity == ref.capacity
    for name in ("sorted_pairs", "pair_pos", "block_experts", "total_padded"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(ref, name).cpu(), rtol=0, atol=0)
    _check_gemms(kernels, got, weights, experts, 328, 88, dtype)


def _skewed_routing(tokens: int, k: int, experts: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert 1 gets no pair (its blocks never exist), expert 0 half the tokens (several blocks)."""
    logits = torch.randn(tokens, experts)
    logits[:, 1] = -math.inf
    logits[: tokens // 2, 0] = math.inf
    ids = torch.topk(logits, k, dim=-1).indices.to(device, torch.int32).contiguous()
    return torch.rand(tokens, k, device=device), ids


def _check_gemms(kernels, alignment, topk_weights, experts: int, hidden: int, inter: int,
                 dtype: torch.dtype) -> None:
    """moe_gate_up then moe_down over `alignment` == the references, on the real rows."""
    device = alignment.pair_pos.device
    assert 1 not in alignment.block_experts.tolist()
    gate_up, down = _weights(experts, hidden, inter, device, dtype)
    x = torch.randn(alignment.num_tokens, hidden, device=device).to(dtype)
    rows = _real_rows(alignment).to(device)
    h = kernels.moe_gate_up(x, gate_up, alignment)
    assert_close(h[rows], reference_moe.moe_gate_up(x, gate_up, alignment)[rows], dtype, scale=2)
    y = kernels.moe_down(h, down, topk_weights, alignment)
    assert_close(y[rows], reference_moe.moe_down(h, down, topk_weights, alignment)[rows], dtype, scale=2)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("hidden", [2048, 72, 100])
def test_moe_combine_more_than_eight_pairs_and_dropped(kernels, device, dtype, hidden):
    """k = 10 (two groups of pair loads), dropped pairs, packed and scalar rows."""
    _, ids = _routing(7, 10, 20, device)
    ids[1, 3] = -1
    ids[4, 9] = 20
    alignment = kernels.moe_align(ids, 20)
    y = torch.randn(alignment.capacity, hidden, device=device).to(dtype)
    assert_close(kernels.moe_combine(y, alignment), reference_moe.moe_combine(y, alignment), dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_moe_chain_matches_per_token_experts(kernels, device, dtype):
    """The ops chained == transformers' Qwen3-MoE expert loop, one token and expert at a time."""
    tokens, k, experts, hidden, inter = 19, 4, 12, 72, 40
    weights, ids = _routing(tokens, k, experts, device)
    gate_up, down = _weights(experts, hidden, inter, device, dtype)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    alignment = kernels.moe_align(ids, experts)
    h = kernels.moe_gate_up(x, gate_up, alignment)
    out = kernels.moe_combine(kernels.moe_down(h, down, weights, alignment), alignment)
    expected = torch.zeros(tokens, hidden, dtype=torch.float32)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            g, u = F.linear(x[t].float(), gate_up[e].float()).cpu().chunk(2)
            expected[t] += F.linear(F.silu(g) * u, down[e].float().cpu()) * weights[t, j].item()
    assert_close(out.float(), expected, dtype, scale=3)


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_experts_full_size_decode_and_batch(kernels, dtype):
    """Qwen3-VL-30B-A3B expert shapes (E=128, H=2048, I=768, top-8) at batch 1, 64, 512 and
    1000 (blocks of 16, 16, 64, 64) and a 4096-token prefill (blocks of 128)."""
    experts, hidden, inter = 128, 2048, 768
    gate_up, down = _weights(experts, hidden, inter, "cuda", dtype)
    for tokens in (1, 64, 512, 1000, 4096):
        weights, ids = _routing(tokens, 8, experts, "cuda")
        x = torch.randn(tokens, hidden, device="cuda").to(dtype)
        alignment = kernels.moe_align(ids, experts)
        rows = _real_rows(alignment)
        h = kernels.moe_gate_up(x, gate_up, alignment)
        assert_close(h[rows], reference_moe.moe_gate_up(x, gate_up, alignment)[rows], dtype, scale=2)
        y = kernels.moe_down(h, down, weights, alignment)
        assert_close(y[rows], reference_moe.moe_down(h, down, weights, alignment)[rows], dtype, scale=2)


@GPU
@pytest.mark.parametrize("tokens", [8, 64])
def test_moe_experts_capture_in_a_cuda_graph(kernels, tokens):
    """No host sync: the whole chain (one-launch routing at 8 tokens, two at 64) records into
    a CUDA graph and replays == eager."""
    k, experts, hidden, inter = 8, 128, 256, 128
    gate_up, down = _weights(experts, hidden, inter, "cuda", torch.bfloat16)
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    logits = torch.randn(tokens, experts, device="cuda")

    def step() -> torch.Tensor:
        weights, _, alignment = kernels.moe_route(logits, k, True)
        h = kernels.moe_gate_up(x, gate_up, alignment)
        return kernels.moe_combine(kernels.moe_down(h, down, weights, alignment), alignment)

    # New routing, same graph.
    assert_graph_replay_equals_eager(step, lambda: logits.copy_(torch.randn(tokens, experts, device="cuda")))


@pytest.mark.parametrize("device", DEVICES)
def test_moe_gate_up_rejects_mismatched_weight(kernels, device):
    alignment = kernels.moe_align(torch.zeros(2, 1, dtype=torch.int32, device=device), 2)
    with raises(device, "weight"):
        kernels.moe_gate_up(torch.randn(2, 8, device=device), torch.randn(2, 6, 9, device=device), alignment)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_ops_opcheck(kernels, device):
    tokens, k, experts, hidden, inter = 6, 2, 5, 16, 8
    weights, ids = _routing(tokens, k, experts, device)
    a = kernels.moe_align(ids, experts)
    alignment_args = (a.sorted_pairs, a.block_experts, a.total_padded)
    outs = (torch.empty_like(a.sorted_pairs), torch.empty_like(a.pair_pos),
            torch.empty_like(a.block_experts), torch.empty_like(a.total_padded))
    torch.library.opcheck(torch.ops.splitvl.moe_align.default, (*outs, ids, experts))
    routed = (torch.empty_like(weights), torch.empty_like(ids))
    logits = torch.randn(tokens, experts, device=device)
    torch.library.opcheck(torch.ops.splitvl.moe_route.default, (*routed, *outs, logits, True))
    gate_up, down = _weights(experts, hidden, inter, device, torch.float32)
    x = torch.randn(tokens, hidden, device=device)
    h = torch.zeros(a.capacity, inter, device=device)
    torch.library.opcheck(torch.ops.splitvl.moe_gate_up.default, (h, x, gate_up, *alignment_args, k))
    y = torch.zeros(a.capacity, hidden, device=device)
    torch.library.opcheck(torch.ops.splitvl.moe_down.default, (y, h, down, weights, *alignment_args))
    out = torch.empty(tokens, hidden, device=device)
    torch.library.opcheck(torch.ops.splitvl.moe_combine.default, (out, y, a.pair_pos, None))
