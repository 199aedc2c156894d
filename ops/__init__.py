"""splitvl custom ops: typed wrappers over `torch.ops.splitvl` (docs/INTERNALS.md).

On import the C++/CUDA extension is built (or loaded from its cache) by
`ops.build` (`ops/_extension.py`). If that fails, one warning names the cause
and every wrapper is the pure-torch reference of the same name in
`ops.reference` / `ops.reference_linear_attn` instead. `SPLITVL_REFERENCE_OPS=1`
skips the build and uses the references directly.

The wrappers run in every layer of every step, so they only allocate outputs
and call the op. Each is declared once, by `@_ops.op(<its reference module>)`.

Linear-attention state pools: conv states `[num_slots, dim, width-1]` (x's
dtype) and recurrent states `[num_slots, Hv, Dk, Dv]` (fp32) belong to the
engine; sequence `b` of a batch uses slot `state_indices[b]` (int32). Slots of
one batch must be distinct; a slot < 0 means none (zero start, final state
dropped: CUDA-graph padding). `has_initial_state[b]` false starts sequence `b`
from zeros (a new prompt), true (or the tensor None) continues from its slot
(chunked prefill).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ops import reference, reference_linear_attn, reference_moe
from ops._extension import STATE, OpTable, extension_available, fallback_reason
from ops.reference_moe import MoeAlignment, align_block_size, align_capacity

_ops = OpTable(STATE)


@_ops.op(reference)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Shapes: x [..., D] (unit last stride, any outer strides), weight [D] -> [..., D]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.rms_norm.default(out, x, weight, eps)
    return out


@_ops.op(reference)
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual += x; x = rms_norm(residual). Shapes: x, residual [..., D]."""
    torch.ops.splitvl.fused_add_rms_norm.default(x, residual, weight, eps)


@_ops.op(reference)
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> None:
    """RoPE / mRoPE in place. Shapes: positions [T] or [S, T]; query [T, Hq*D] or
    [T, Hq, D]; key likewise or None; cos_sin_cache [max_pos, rot_dim] fp32."""
    torch.ops.splitvl.rotary_embedding.default(
        positions, query, key, head_size, cos_sin_cache, is_neox,
        list(mrope_section) if mrope_section else [], mrope_interleaved,
    )


@_ops.op(reference)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Shapes: x [..., 2d] -> [..., d]."""
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    torch.ops.splitvl.silu_and_mul.default(out, x)
    return out


@_ops.op(reference)
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Shapes: x [...] -> same (tanh-approximated gelu)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.gelu_tanh.default(out, x)
    return out


@_ops.op(reference)
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Shapes: key/value [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]; slot_mapping [T] int64."""
    torch.ops.splitvl.reshape_and_cache.default(key, value, key_cache, value_cache, slot_mapping)


@_ops.op(reference)
def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Shapes: query [B, Hq, D]; caches [num_blocks, block_size, Hkv, D];
    block_tables [B, max_blocks] int32; seq_lens [B] int32 -> [B, Hq, D]."""
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.splitvl.paged_attention_decode.default(
        out, query, key_cache, value_cache, block_tables, seq_lens, scale
    )
    return out


@_ops.op(reference)
def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    key_cache: torch.Tensor | None = None,
    value_cache: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shapes: query [Tq, Hq, D]; key/value [Tk, Hkv, D] or None with the paged
    caches and block_tables [B, max_blocks]; cu_seqlens_q/k [B+1] int32 -> [Tq, Hq, D]."""
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.splitvl.varlen_attention.default(
        out, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, causal, key_cache, value_cache, block_tables,
    )
    return out


@_ops.op(reference)
def topk_softmax(
    gating_output: torch.Tensor, topk: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes: gating_output [T, E] -> (weights fp32 [T, k], ids int32 [T, k])."""
    tokens = gating_output.shape[0]
    weights = torch.empty((tokens, topk), dtype=torch.float32, device=gating_output.device)
    ids = torch.empty((tokens, topk), dtype=torch.int32, device=gating_output.device)
    torch.ops.splitvl.topk_softmax.default(weights, ids, gating_output, renormalize)
    return weights, ids


# MoE experts: pairs sorted by expert into blocks (ops/reference_moe.py); no host sync.


@_ops.op(reference_moe)
def moe_align(topk_ids: torch.Tensor, num_experts: int) -> MoeAlignment:
    """Sort the routed pairs by expert, padded per expert to the block size chosen from T*k/E.

    Shapes: topk_ids int32 [T, k] -> MoeAlignment (sizes from T, k, E only).
    """
    tokens, k = topk_ids.shape
    block = align_block_size(tokens * k, num_experts)
    capacity = align_capacity(tokens * k, num_experts, block)
    device = topk_ids.device
    sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=device)
    pair_pos = torch.empty((tokens, k), dtype=torch.int32, device=device)
    block_experts = torch.empty(capacity // block, dtype=torch.int32, device=device)
    total_padded = torch.empty(1, dtype=torch.int32, device=device)
    torch.ops.splitvl.moe_align.default(
        sorted_pairs, pair_pos, block_experts, total_padded, topk_ids, num_experts
    )
    return MoeAlignment(sorted_pairs, pair_pos, block_experts, total_padded, block)


@_ops.op(reference_moe)
def moe_gate_up(x: torch.Tensor, weight: torch.Tensor, alignment: MoeAlignment) -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) for each aligned pair with its expert's weights.

    Shapes: x [T, H]; weight [E, 2I, H] -> [capacity, I].
    """
    out = torch.empty((alignment.capacity, weight.shape[1] // 2), dtype=x.dtype, device=x.device)
    torch.ops.splitvl.moe_gate_up.default(
        out, x, weight, alignment.sorted_pairs, alignment.block_experts,
        alignment.total_padded, alignment.top_k,
    )
    return out


@_ops.op(reference_moe)
def moe_down(
    h: torch.Tensor, weight: torch.Tensor, topk_weights: torch.Tensor, alignment: MoeAlignment
) -> torch.Tensor:
    """h W_down^T of each aligned pair's expert, scaled by the pair's routing weight.

    Shapes: h [capacity, I]; weight [E, H, I]; topk_weights fp32 [T, k] -> [capacity, H].
    """
    out = torch.empty((alignment.capacity, weight.shape[1]), dtype=h.dtype, device=h.device)
    torch.ops.splitvl.moe_down.default(
        out, h, weight, topk_weights, alignment.sorted_pairs, alignment.block_experts,
        alignment.total_padded,
    )
    return out


@_ops.op(reference_moe)
def moe_combine(y: torch.Tensor, alignment: MoeAlignment) -> torch.Tensor:
    """out[t] = sum over its k pairs of y[pair_pos[t, j]]. Shapes: y [capacity, H] -> [T, H]."""
    out = torch.empty((alignment.num_tokens, y.shape[1]), dtype=y.dtype, device=y.device)
    torch.ops.splitvl.moe_combine.default(out, y, alignment.pair_pos)
    return out


# Qwen3.5 linear attention (Gated DeltaNet); state pools as in the module docstring.


@_ops.op(reference_linear_attn)
def causal_conv1d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """Depthwise causal conv over packed sequences; writes each final conv state.

    Shapes: x [T, dim] token-major (unit stride along dim, any row stride),
    weight [dim, W], bias [dim] | None, conv_states [num_slots, dim, W-1] (in
    place), cu_seqlens [B+1] int32, state_indices [B] int32,
    has_initial_state [B] bool | None -> out [T, dim].
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.causal_conv1d_fwd.default(
        out, x, weight, bias, conv_states, cu_seqlens, state_indices, has_initial_state, silu
    )
    return out


@_ops.op(reference_linear_attn)
def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    state_indices: torch.Tensor,
    silu: bool = True,
) -> torch.Tensor:
    """Decode step: one new token per sequence, conv state shifted in place.

    Shapes: x [B, dim], weight [dim, W], conv_states [num_slots, dim, W-1],
    state_indices [B] int32 -> out [B, dim].
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.causal_conv1d_update.default(
        out, x, weight, bias, conv_states, state_indices, silu
    )
    return out


@_ops.op(reference_linear_attn)
def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor,
    states: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Gated delta rule prefill over packed sequences (chunks of 64), fp32 state.

    Value head h reads query/key head h // (Hv // Hk). q is scaled by Dk^-0.5
    (after the l2 norm when `use_qk_l2norm`).

    Shapes: q, k [T, Hk, Dk], v [T, Hv, Dv] (unit stride along the head dim,
    any token/head strides), g (log decay) and beta [T, Hv], cu_seqlens [B+1]
    int32, states [num_slots, Hv, Dk, Dv] fp32 (in place), state_indices [B]
    int32, has_initial_state [B] bool | None -> out [T, Hv, Dv] in q's dtype.
    """
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    torch.ops.splitvl.gated_delta_rule_chunked.default(
        out, q, k, v, g.float().contiguous(), beta.float().contiguous(), cu_seqlens,
        states, state_indices, has_initial_state, use_qk_l2norm,
    )
    return out


@_ops.op(reference_linear_attn)
def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    state_indices: torch.Tensor,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Gated delta rule decode step: one token per sequence, continuing its slot.

    Shapes: q, k [B, Hk, Dk], v [B, Hv, Dv], g and beta [B, Hv], states
    [num_slots, Hv, Dk, Dv] fp32 (in place), state_indices [B] int32
    -> out [B, Hv, Dv] in q's dtype.
    """
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    torch.ops.splitvl.gated_delta_rule_recurrent.default(
        out, q, k, v, g.float().contiguous(), beta.float().contiguous(), states,
        state_indices, use_qk_l2norm,
    )
    return out


@_ops.op(reference_linear_attn)
def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight * silu(z) (transformers' Qwen3_5RMSNormGated; weight as is).

    Shapes: x, z [..., D] (views with outer strides are fine), weight [D] in x's
    dtype or fp32 -> out [..., D] contiguous in x's dtype.
    """
    d = x.shape[-1]
    x2 = x.reshape(-1, d) if x.stride(-1) == 1 else x.contiguous().view(-1, d)
    z2 = z.reshape(-1, d) if z.stride(-1) == 1 else z.contiguous().view(-1, d)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.gated_rms_norm.default(out.view(-1, d), x2, z2, weight, eps)
    return out


# The declared ops, in declaration order (tests check them against the schemas and references).
OPS = _ops.ops()

__all__ = [
    "extension_available", "fallback_reason", "MoeAlignment", *(bound.name for bound in OPS)
]
