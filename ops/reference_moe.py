"""Pure-torch references of the MoE expert ops (the law for the kernels).

A routed (token, expert) *pair* is `p = t * k + j` for `topk_ids[t, j]`. The
expert GEMMs run over pairs sorted by expert and padded per expert to a
multiple of the block size, so each block of `block_size` rows belongs to one
expert (`MoeAlignment`). Every output size is an upper bound computed on the
host from (T, k, E, block), never from device data, so nothing syncs with the
host and a MoE step can be captured in a CUDA graph.

Rows of the aligned buffers that hold padding (or lie beyond
`total_padded`) are unspecified; only real pairs are read back by
`moe_combine`. Expert ids outside [0, E) are dropped (their pair has no
position and adds nothing).

Large prefills take the unpadded order instead (`MoePermutation`, `moe_permute`):
each expert's rows are one contiguous run ending at `expert_offsets[e]`, the
layout of a grouped GEMM over offsets (`torch._grouped_mm`), and the combine
applies the router weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ops import reference


class _RoutedPairs:
    """The [T, k] shape of the routed pairs, read from `pair_pos` (a field of each subclass)."""

    __slots__ = ()
    pair_pos: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.pair_pos.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.pair_pos.shape[0]


@dataclass(frozen=True, slots=True)
class MoeAlignment(_RoutedPairs):
    """Pairs sorted by expert (stable: ascending pair index within an expert), padded per expert.

    Shapes: sorted_pairs int32 [capacity] (pair index, or T*k for padding);
    pair_pos int32 [T, k] (row of each pair in sorted_pairs, -1 when dropped);
    block_experts int32 [capacity / block_size] (-1 beyond the total);
    total_padded int32 [1] (rows in use, a multiple of block_size).
    """

    sorted_pairs: torch.Tensor
    pair_pos: torch.Tensor
    block_experts: torch.Tensor
    total_padded: torch.Tensor
    block_size: int

    @property
    def capacity(self) -> int:
        return self.sorted_pairs.shape[0]


def align_block_size(pairs: int, num_experts: int) -> int:
    """Rows per expert block: 16 when experts see few pairs (decode), 64 or 128 for prefill.

    Each block reads its expert's weights once, so rows per block are the weight
    reuse of the tensor-core tile. Below 64 pairs per expert the GEMMs are bound by
    reading the weights: one 64-row block holds most experts whole (two 32-row
    blocks would read their weights twice). From 64, 128-row blocks halve the
    weight traffic per row at the price of more padding (H200, 30B-A3B experts:
    T=512 b64 486 us vs b128 602; T=1,024 b128 648 us vs b64 703; BENCHMARKS.md 9.4).
    """
    per_expert = pairs / max(1, num_experts)
    if per_expert <= 16:
        return 16
    return 64 if per_expert < 64 else 128


def align_capacity(pairs: int, num_experts: int, block_size: int) -> int:
    """Upper bound of the padded row count: each expert hit adds at most block_size - 1 rows."""
    hit = min(pairs, num_experts)
    return (pairs + hit * (block_size - 1)) // block_size * block_size


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_size: int | None = None
) -> MoeAlignment:
    """Sort the routed pairs by expert and pad each expert's run to a block multiple.

    The block size comes from T*k/E (`align_block_size`) unless `block_size` is
    given (tests and benchmarks of one kernel tile), the capacity from
    `align_capacity`: sizes from T, k and E only, never from device data.

    Shapes: topk_ids int32 [T, k] -> MoeAlignment.
    """
    tokens, k = topk_ids.shape
    pairs = tokens * k
    block = block_size or align_block_size(pairs, num_experts)
    capacity = align_capacity(pairs, num_experts, block)
    device = topk_ids.device
    sorted_pairs = torch.full((capacity,), pairs, dtype=torch.int32, device=device)
    pair_pos = torch.full((pairs,), -1, dtype=torch.int32, device=device)
    block_experts = torch.full((capacity // block,), -1, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1).long().cpu()
    row = 0
    for expert in range(num_experts):
        members = torch.nonzero(ids == expert).flatten()  # ascending pair index
        if members.numel() == 0:
            continue
        padded = -(-members.numel() // block) * block
        positions = torch.arange(row, row + members.numel())
        sorted_pairs[positions.to(device)] = members.to(device, torch.int32)
        pair_pos[members.to(device)] = positions.to(device, torch.int32)
        block_experts[row // block : (row + padded) // block] = expert
        row += padded
    total = torch.tensor([row], dtype=torch.int32, device=device)
    return MoeAlignment(sorted_pairs, pair_pos.view(tokens, k), block_experts, total, block)


@dataclass(frozen=True, slots=True)
class MoePermutation(_RoutedPairs):
    """Pairs sorted by expert (stable: ascending pair index within an expert), no padding.

    Expert e owns rows [expert_offsets[e - 1], expert_offsets[e]) (from 0 for e = 0);
    rows past expert_offsets[-1] (one per dropped pair) are unused.

    Shapes: row_tokens int32 [T*k] (token of each row's pair; 0 in unused rows, a valid
    row to gather); pair_pos int32 [T, k] (row of each pair, -1 when dropped);
    expert_offsets int32 [E] (cumulative row ends).
    """

    row_tokens: torch.Tensor
    pair_pos: torch.Tensor
    expert_offsets: torch.Tensor


def moe_permute(topk_ids: torch.Tensor, num_experts: int) -> MoePermutation:
    """Sort the routed pairs by expert without padding (the rows of a grouped GEMM).

    Sizes come from T, k and E only, never from device data.

    Shapes: topk_ids int32 [T, k] -> MoePermutation.
    """
    tokens, k = topk_ids.shape
    device = topk_ids.device
    ids = topk_ids.reshape(-1).long().cpu()
    routed = (ids >= 0) & (ids < num_experts)
    order = torch.nonzero(routed).flatten()
    order = order[torch.sort(ids[order], stable=True).indices]  # by expert, then pair index
    row_tokens = torch.zeros(tokens * k, dtype=torch.int32)
    row_tokens[: order.numel()] = (order // k).to(torch.int32)
    pair_pos = torch.full((tokens * k,), -1, dtype=torch.int32)
    pair_pos[order] = torch.arange(order.numel(), dtype=torch.int32)
    counts = torch.bincount(ids[routed], minlength=num_experts)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return MoePermutation(row_tokens.to(device), pair_pos.view(tokens, k).to(device), offsets.to(device))


def moe_route(
    gating_output: torch.Tensor, topk: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, MoeAlignment]:
    """The router's `topk_softmax`, then `moe_align` of its ids over E = gating_output's width.

    Shapes: gating_output [T, E] -> (topk_weights fp32 [T, k], topk_ids int32 [T, k], MoeAlignment).
    """
    weights, ids = reference.topk_softmax(gating_output, topk, renormalize)
    return weights, ids, moe_align(ids, gating_output.shape[1])


def _expert_runs(alignment: MoeAlignment) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, rows, pair indices) of each expert's real rows."""
    pairs = alignment.num_tokens * alignment.top_k
    sorted_pairs = alignment.sorted_pairs.long().cpu()
    block_experts = alignment.block_experts.long().cpu()
    total = int(alignment.total_padded.item())
    runs = []
    for expert in torch.unique(block_experts[: total // alignment.block_size]).tolist():
        blocks = torch.nonzero(block_experts == expert).flatten()
        rows = (blocks[:, None] * alignment.block_size + torch.arange(alignment.block_size)).flatten()
        rows = rows[sorted_pairs[rows] < pairs]
        runs.append((expert, rows, sorted_pairs[rows]))
    return runs


def moe_gate_up(x: torch.Tensor, weight: torch.Tensor, alignment: MoeAlignment) -> torch.Tensor:
    """Row r of pair p = (t, j) routed to expert e: silu(x[t] W_gate[e]^T) * (x[t] W_up[e]^T).

    Shapes: x [T, H]; weight [E, 2I, H] (gate rows, then up rows) -> [capacity, I].
    """
    inter = weight.shape[1] // 2
    out = torch.zeros((alignment.capacity, inter), dtype=x.dtype, device=x.device)
    for expert, rows, pairs in _expert_runs(alignment):
        gate_up = F.linear(x[(pairs // alignment.top_k).to(x.device)].float(), weight[expert].float())
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out[rows.to(x.device)] = h.to(x.dtype)
    return out


def moe_down(
    h: torch.Tensor, weight: torch.Tensor, topk_weights: torch.Tensor, alignment: MoeAlignment
) -> torch.Tensor:
    """Row r of pair p routed to expert e: (h[r] W_down[e]^T) * topk_weights.flat[p].

    Shapes: h [capacity, I]; weight [E, H, I]; topk_weights fp32 [T, k] -> [capacity, H].
    """
    out = torch.zeros((alignment.capacity, weight.shape[1]), dtype=h.dtype, device=h.device)
    flat_weights = topk_weights.reshape(-1).float()
    for expert, rows, pairs in _expert_runs(alignment):
        rows, pairs = rows.to(h.device), pairs.to(h.device)
        y = F.linear(h[rows].float(), weight[expert].float()) * flat_weights[pairs, None]
        out[rows] = y.to(h.dtype)
    return out


def moe_combine(
    y: torch.Tensor, alignment: MoeAlignment | MoePermutation, topk_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """out[t] = sum over j of w[t, j] * y[pair_pos[t, j]] (fp32 sum in j order; dropped pairs add
    nothing); w = topk_weights, or 1 when None (`moe_down` already applied them).

    Shapes: y [rows, H]; topk_weights fp32 [T, k] or None -> [T, H].
    """
    pos = alignment.pair_pos.long()
    rows = y.float()[pos.clamp(min=0)]
    if topk_weights is not None:
        rows = rows * topk_weights.float()[..., None]
    rows = torch.where((pos >= 0)[..., None], rows, 0.0)  # a dropped pair's row 0 may be unused
    return rows.sum(dim=1).to(y.dtype)


def moe_gate_route(
    x: torch.Tensor, gate_weight: torch.Tensor, topk: int, renormalize: bool, arrivals: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, MoeAlignment]:
    """The router linear and `moe_route` in one op: `moe_route(x gate_weight^T, topk, renormalize)`
    with the logits summed and kept in fp32 (never rounded to x's dtype).

    `arrivals` is a persistent int32 [1] counter, zero between calls, that the CUDA kernel's
    blocks count themselves on (the last one routes and resets it, so a CUDA graph can replay
    the op without a memset); the references leave it alone.

    Shapes: x [T, H]; gate_weight [E, H]; arrivals int32 [1] ->
    (topk_weights fp32 [T, k], topk_ids int32 [T, k], MoeAlignment).
    """
    logits = F.linear(x.float(), gate_weight.float())
    return moe_route(logits, topk, renormalize)


def moe_combine_add_rms_norm(
    y: torch.Tensor, alignment: MoeAlignment | MoePermutation, topk_weights: torch.Tensor | None,
    residual: torch.Tensor,
    norm_weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_combine`, then `fused_add_rms_norm` of its result into `residual` (in place).

    The combine is rounded to y's dtype before the add, as the two ops round, so the result
    is theirs: `residual = combine(y) + residual` (rounded), `normed = rms_norm(residual)`.
    Shapes: y [rows, H]; topk_weights fp32 [T, k] or None; residual [T, H] (y's dtype,
    unit last stride); norm_weight [H] -> (normed [T, H], residual).
    """
    normed = moe_combine(y, alignment, topk_weights)
    reference.fused_add_rms_norm(normed, residual, norm_weight, eps)
    return normed, residual


# Tokens up to which the CUDA kernel of `moe_decode_block` runs the whole block in one
# launch; larger steps (and shapes it cannot take) run the chain of ops it replaces.
MOE_DECODE_BLOCK_MAX_TOKENS = 8


def moe_decode_block(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    gate_weight: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    topk: int, renormalize: bool, barrier: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A MoE layer's second half at decode (no shared expert, TP=1), as the chain of ops it
    replaces rounds: `fused_add_rms_norm(x, residual)` (residual updated in place, x left
    alone) -> router logits `normed gate_weight^T` summed in fp32 and rounded to the dtype
    (`ReplicatedLinear`'s) -> `moe_route` -> `moe_gate_up` -> `moe_down` (router weights
    applied, rows rounded) -> `moe_combine` (fp32 sum of the rounded rows in j order).

    `barrier` is a persistent int32 [1] the CUDA kernel's grid barrier counts on (its low
    31 bits are back to 0 after every launch, so a CUDA graph replays the op without a
    memset; a new block's is zeros); the references leave it alone. The CUDA kernel runs
    T <= `MOE_DECODE_BLOCK_MAX_TOKENS` in one launch, other steps the chain.

    Shapes: x [T, H], residual [T, H] (x's dtype, unit last stride); norm_weight [H] (x's
    dtype or fp32); gate_weight [E, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I] ->
    (out [T, H], residual).
    """
    normed = x.clone()
    reference.fused_add_rms_norm(normed, residual, norm_weight, eps)
    logits = F.linear(normed, gate_weight)
    weights, _, alignment = moe_route(logits, topk, renormalize)
    h = moe_gate_up(normed, gate_up_proj, alignment)
    return moe_combine(moe_down(h, down_proj, weights, alignment), alignment), residual
