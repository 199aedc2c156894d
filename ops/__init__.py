"""splitvl custom ops: typed wrappers over `torch.ops.splitvl` (docs/INTERNALS.md).

On import the C++/CUDA extension is built (or loaded from its cache) by
`ops.build` (`ops/_extension.py`). If that fails, one warning names the cause
and every wrapper is the pure-torch reference of the same name in
`ops.reference` / `ops.reference_linear_attn` instead. `SPLITVL_REFERENCE_OPS=1`
skips the build and uses the references directly.

The wrappers run in every layer of every step, so they only allocate outputs
and call the op. Each is declared once, by `@_ops.op(<its reference module>)`,
over a function of the reference's parameter names: the typed signature, the
defaults and the docstring (semantics, shapes) are the reference's, written
once there and given to the wrapper by the decorator (`help(ops.rms_norm)`).

Linear-attention state pools: conv states `[num_slots, dim, width-1]` (x's
dtype) and recurrent states `[num_slots, Hv, Dk, Dv]` (fp32) belong to the
engine; sequence `b` of a batch uses slot `state_indices[b]` (int32). Slots of
one batch must be distinct; a slot < 0 means none (zero start, final state
dropped: CUDA-graph padding). `has_initial_state[b]` false starts sequence `b`
from zeros (a new prompt), true (or the tensor None) continues from its slot
(chunked prefill).
"""

from __future__ import annotations

import torch

from ops import reference, reference_comm, reference_linear_attn, reference_moe
from ops._extension import STATE, OpTable, extension_available, fallback_reason
from ops.attention_sm90 import (attention_sm90, attention_sm90_available, attention_sm90_enabled,
                                set_attention_sm90)
from ops.decode_merge import decode_fused_merge, decode_fused_merge_enabled, set_decode_fused_merge
from ops.pdl import programmatic_launch, programmatic_launch_enabled, set_programmatic_launch
from ops.reference_moe import (MOE_DECODE_BLOCK_MAX_TOKENS, MoeAlignment, MoePermutation, align_block_size,
                               align_capacity)

_ops = OpTable(STATE)


@_ops.op(reference)
def rms_norm(x, weight, eps):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.rms_norm.default(out, x, weight, eps)
    return out


@_ops.op(reference)
def fused_add_rms_norm(x, residual, weight, eps):
    torch.ops.splitvl.fused_add_rms_norm.default(x, residual, weight, eps)


@_ops.op(reference)
def rotary_embedding(
    positions, query, key, head_size, cos_sin_cache, is_neox, mrope_section, mrope_interleaved
):
    torch.ops.splitvl.rotary_embedding.default(
        positions, query, key, head_size, cos_sin_cache, is_neox,
        list(mrope_section) if mrope_section else [], mrope_interleaved,
    )


@_ops.op(reference)
def qk_norm_rope(
    positions, query, key, q_weight, k_weight, eps, cos_sin_cache, is_neox, mrope_section, mrope_interleaved
):
    torch.ops.splitvl.qk_norm_rope.default(
        positions, query, key, q_weight, k_weight, eps, cos_sin_cache, is_neox,
        list(mrope_section) if mrope_section else [], mrope_interleaved,
    )


@_ops.op(reference)
def silu_and_mul(x):
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    torch.ops.splitvl.silu_and_mul.default(out, x)
    return out


@_ops.op(reference)
def gelu_tanh(x):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.gelu_tanh.default(out, x)
    return out


@_ops.op(reference)
def linear_small(x, weight, bias):
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    torch.ops.splitvl.linear_small.default(out, x, weight, bias)
    return out



@_ops.op(reference)
def add_rms_norm_linear_small(x, residual, norm_weight, eps, weight, bias):
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.add_rms_norm_linear_small.default(out, residual_out, x, residual, norm_weight, eps, weight, bias)
    return out, residual_out

@_ops.op(reference)
def gate_up_silu_small(x, weight):
    out = torch.empty((x.shape[0], weight.shape[0] // 2), dtype=x.dtype, device=x.device)
    torch.ops.splitvl.gate_up_silu_small.default(out, x, weight)
    return out


@_ops.op(reference)
def sigmoid_gate_mul(x, gate):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.sigmoid_gate_mul.default(out, x, gate)
    return out


@_ops.op(reference)
def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    torch.ops.splitvl.reshape_and_cache.default(key, value, key_cache, value_cache, slot_mapping)


@_ops.op(reference)
def qk_norm_rope_and_cache(
    positions, query, key, value, q_weight, k_weight, eps, cos_sin_cache, key_cache, value_cache, slot_mapping,
    is_neox, mrope_section, mrope_interleaved,
):
    torch.ops.splitvl.qk_norm_rope_and_cache.default(
        positions, query, key, value, q_weight, k_weight, eps, cos_sin_cache, key_cache, value_cache, slot_mapping,
        is_neox, list(mrope_section) if mrope_section else [], mrope_interleaved,
    )


@_ops.op(reference)
def paged_attention_decode(query, key_cache, value_cache, block_tables, seq_lens, scale):
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.splitvl.paged_attention_decode.default(
        out, query, key_cache, value_cache, block_tables, seq_lens, scale
    )
    return out


@_ops.op(reference)
def varlen_attention(
    query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
    key_cache, value_cache, block_tables,
):
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.splitvl.varlen_attention.default(
        out, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, causal, key_cache, value_cache, block_tables,
    )
    return out


@_ops.op(reference)
def topk_softmax(gating_output, topk, renormalize):
    tokens = gating_output.shape[0]
    weights = torch.empty((tokens, topk), dtype=torch.float32, device=gating_output.device)
    ids = torch.empty((tokens, topk), dtype=torch.int32, device=gating_output.device)
    torch.ops.splitvl.topk_softmax.default(weights, ids, gating_output, renormalize)
    return weights, ids


# MoE experts: pairs sorted by expert into blocks, or unpadded for a grouped GEMM
# (ops/reference_moe.py); no host sync.


def _alignment_buffers(
    tokens: int, k: int, num_experts: int, device: torch.device, block: int | None = None
) -> MoeAlignment:
    """Uninitialised alignment tensors sized from (T, k, E) and the block only (no host sync)."""
    block = block or align_block_size(tokens * k, num_experts)
    capacity = align_capacity(tokens * k, num_experts, block)
    return MoeAlignment(
        torch.empty(capacity, dtype=torch.int32, device=device),
        torch.empty((tokens, k), dtype=torch.int32, device=device),
        torch.empty(capacity // block, dtype=torch.int32, device=device),
        torch.empty(1, dtype=torch.int32, device=device),
        block,
    )


@_ops.op(reference_moe)
def moe_align(topk_ids, num_experts, block_size):
    a = _alignment_buffers(*topk_ids.shape, num_experts, topk_ids.device, block_size)
    torch.ops.splitvl.moe_align.default(
        a.sorted_pairs, a.pair_pos, a.block_experts, a.total_padded, topk_ids, num_experts
    )
    return a


@_ops.op(reference_moe)
def moe_route(gating_output, topk, renormalize):
    tokens, experts = gating_output.shape
    device = gating_output.device
    weights = torch.empty((tokens, topk), dtype=torch.float32, device=device)
    ids = torch.empty((tokens, topk), dtype=torch.int32, device=device)
    a = _alignment_buffers(tokens, topk, experts, device)
    torch.ops.splitvl.moe_route.default(
        weights, ids, a.sorted_pairs, a.pair_pos, a.block_experts, a.total_padded,
        gating_output, renormalize,
    )
    return weights, ids, a


@_ops.op(reference_moe)
def moe_gate_route(x, gate_weight, topk, renormalize, arrivals):
    tokens, experts = x.shape[0], gate_weight.shape[0]
    device = x.device
    weights = torch.empty((tokens, topk), dtype=torch.float32, device=device)
    ids = torch.empty((tokens, topk), dtype=torch.int32, device=device)
    logits = torch.empty((tokens, experts), dtype=torch.float32, device=device)
    a = _alignment_buffers(tokens, topk, experts, device)
    torch.ops.splitvl.moe_gate_route.default(
        weights, ids, a.sorted_pairs, a.pair_pos, a.block_experts, a.total_padded, logits, arrivals,
        x, gate_weight, renormalize,
    )
    return weights, ids, a


@_ops.op(reference_moe)
def moe_gate_up(x, weight, alignment):
    out = torch.empty((alignment.capacity, weight.shape[1] // 2), dtype=x.dtype, device=x.device)
    torch.ops.splitvl.moe_gate_up.default(
        out, x, weight, alignment.sorted_pairs, alignment.block_experts,
        alignment.total_padded, alignment.top_k,
    )
    return out


@_ops.op(reference_moe)
def moe_down(h, weight, topk_weights, alignment):
    out = torch.empty((alignment.capacity, weight.shape[1]), dtype=h.dtype, device=h.device)
    torch.ops.splitvl.moe_down.default(
        out, h, weight, topk_weights, alignment.sorted_pairs, alignment.block_experts,
        alignment.total_padded,
    )
    return out


@_ops.op(reference_moe)
def moe_permute(topk_ids, num_experts):
    tokens, k = topk_ids.shape
    device = topk_ids.device
    p = MoePermutation(
        torch.empty(tokens * k, dtype=torch.int32, device=device),
        torch.empty((tokens, k), dtype=torch.int32, device=device),
        torch.empty(num_experts, dtype=torch.int32, device=device),
    )
    torch.ops.splitvl.moe_permute.default(p.row_tokens, p.pair_pos, p.expert_offsets, topk_ids, num_experts)
    return p


@_ops.op(reference_moe)
def moe_combine(y, alignment, topk_weights):
    out = torch.empty((alignment.num_tokens, y.shape[1]), dtype=y.dtype, device=y.device)
    torch.ops.splitvl.moe_combine.default(out, y, alignment.pair_pos, topk_weights)
    return out



@_ops.op(reference_moe)
def moe_combine_add_rms_norm(y, alignment, topk_weights, residual, norm_weight, eps):
    out = torch.empty((alignment.num_tokens, y.shape[1]), dtype=y.dtype, device=y.device)
    torch.ops.splitvl.moe_combine_add_rms_norm.default(
        out, residual, y, alignment.pair_pos, topk_weights, norm_weight, eps
    )
    return out, residual


@_ops.op(reference_moe)
def moe_decode_block(x, residual, norm_weight, eps, gate_weight, gate_up_proj, down_proj, topk, renormalize, barrier):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.moe_decode_block.default(
        out, residual, barrier, x, norm_weight, eps, gate_weight, gate_up_proj, down_proj, topk, renormalize
    )
    return out, residual


# Qwen3.5 linear attention (Gated DeltaNet); state pools as in the module docstring.


@_ops.op(reference_linear_attn)
def causal_conv1d_fwd(
    x, weight, bias, conv_states, cu_seqlens, state_indices, has_initial_state, silu
):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.causal_conv1d_fwd.default(
        out, x, weight, bias, conv_states, cu_seqlens, state_indices, has_initial_state, silu
    )
    return out


@_ops.op(reference_linear_attn)
def causal_conv1d_update(x, weight, bias, conv_states, state_indices, silu):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.causal_conv1d_update.default(
        out, x, weight, bias, conv_states, state_indices, silu
    )
    return out


@_ops.op(reference_linear_attn)
def gated_delta_rule_chunked(
    q, k, v, g, beta, cu_seqlens, states, state_indices, has_initial_state, use_qk_l2norm
):
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    torch.ops.splitvl.gated_delta_rule_chunked.default(
        out, q, k, v, g.float().contiguous(), beta.float().contiguous(), cu_seqlens,
        states, state_indices, has_initial_state, use_qk_l2norm,
    )
    return out


@_ops.op(reference_linear_attn)
def gated_delta_rule_recurrent(q, k, v, g, beta, states, state_indices, use_qk_l2norm):
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    torch.ops.splitvl.gated_delta_rule_recurrent.default(
        out, q, k, v, g.float().contiguous(), beta.float().contiguous(), states,
        state_indices, use_qk_l2norm,
    )
    return out


@_ops.op(reference_linear_attn)
def gated_rms_norm(x, z, weight, eps):
    # The kernel takes x as [N, D] rows and z as [N, D] or [N / H, H, D] (two outer strides: the
    # model's z [T, Hv, Dv] is a head view of a wider projection's columns, read without a copy),
    # both with unit stride along D.
    d = x.shape[-1]
    x2 = x.reshape(-1, d) if x.stride(-1) == 1 else x.contiguous().view(-1, d)
    z = z if z.stride(-1) == 1 else z.contiguous()
    z2 = z.flatten(0, -3) if z.dim() >= 3 else z.reshape(-1, d)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.gated_rms_norm.default(out.view(-1, d), x2, z2, weight, eps)
    return out


@_ops.op(reference_linear_attn)
def gdn_gating(ba, A_log, dt_bias):
    shape = (ba.shape[0], A_log.shape[0])
    g = torch.empty(shape, dtype=torch.float32, device=ba.device)
    beta = torch.empty(shape, dtype=torch.float32, device=ba.device)
    torch.ops.splitvl.gdn_gating.default(g, beta, ba, A_log, dt_bias)
    return g, beta


@_ops.op(reference_linear_attn)
def gated_delta_net_decode(
    proj, conv_weight, conv_states, A_log, dt_bias, recurrent_states, state_indices, norm_weight, eps,
    use_qk_l2norm,
):
    out = torch.empty((proj.shape[0], A_log.shape[0], norm_weight.shape[0]), dtype=proj.dtype, device=proj.device)
    torch.ops.splitvl.gated_delta_net_decode.default(
        out, proj, conv_weight, conv_states, A_log, dt_bias, recurrent_states, state_indices, norm_weight, eps,
        use_qk_l2norm,
    )
    return out


# The custom all-reduce (models/layers/custom_allreduce.py): buffers shared through CUDA IPC.


@_ops.op(reference_comm)
def custom_ar_export(buffer):
    handle = torch.empty(reference_comm.HANDLE_BYTES, dtype=torch.uint8)
    torch.ops.splitvl.custom_ar_export.default(handle, buffer)
    return handle


@_ops.op(reference_comm)
def custom_ar_open(handles, buffer, rank):
    rank_ptrs = torch.zeros((handles.shape[0], 2), dtype=torch.int64)
    torch.ops.splitvl.custom_ar_open.default(rank_ptrs, handles, buffer, rank)
    return rank_ptrs


@_ops.op(reference_comm)
def custom_ar_close(rank_ptrs, buffer):
    torch.ops.splitvl.custom_ar_close.default(rank_ptrs, buffer)


@_ops.op(reference_comm)
def custom_all_reduce(x, buffer, rank_ptrs, rank):
    torch.ops.splitvl.custom_all_reduce.default(x, buffer, list(rank_ptrs), rank)


# The declared ops, in declaration order (tests check them against the schemas and references).
OPS = _ops.ops()

__all__ = [
    "extension_available", "fallback_reason", "MoeAlignment", "MoePermutation", "MOE_DECODE_BLOCK_MAX_TOKENS",
    "programmatic_launch",
    "programmatic_launch_enabled", "set_programmatic_launch", "attention_sm90", "attention_sm90_available",
    "attention_sm90_enabled", "set_attention_sm90", "decode_fused_merge", "decode_fused_merge_enabled",
    "set_decode_fused_merge", *(bound.name for bound in OPS)
]
