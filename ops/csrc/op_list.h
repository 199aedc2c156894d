// Every op of torch.ops.splitvl, written once as
//   SPLITVL_OP(name, "schema arguments", (C++ parameters))
// Each includer defines SPLITVL_OP to turn the list into what it needs: the kernel
// declarations of one backend (cpu/ops_cpu.h, cuda/ops.cuh), the schemas and CPU
// registrations (torch_bindings.cpp) or the CUDA registrations (cuda/registration.cu).
// No include guard: it is meant to be included once per use. Every op returns () and
// `Tensor!` marks what it writes; the C++ parameters follow the schema one for one.
// Semantics: ops/reference.py, ops/reference_linear_attn.py.

// weight [D] in the input's dtype, or fp32 with a bf16/fp16 input (ops/reference.py rms_norm).
SPLITVL_OP(rms_norm, "Tensor! out, Tensor input, Tensor weight, float epsilon",
           (at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon))
SPLITVL_OP(fused_add_rms_norm,
           "Tensor! input, Tensor! residual, Tensor weight, float epsilon",
           (at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon))
SPLITVL_OP(rotary_embedding,
           "Tensor positions, Tensor! query, Tensor!? key, int head_size, Tensor cos_sin_cache, "
           "bool is_neox, int[] mrope_section, bool mrope_interleaved",
           (const at::Tensor& positions, at::Tensor& query, const std::optional<at::Tensor>& key,
            int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox,
            at::IntArrayRef mrope_section, bool mrope_interleaved))
// rms_norm of each q and k head, then rotary_embedding, in place (ops/reference.py qk_norm_rope).
SPLITVL_OP(qk_norm_rope,
           "Tensor positions, Tensor! query, Tensor! key, Tensor q_weight, Tensor k_weight, "
           "float epsilon, Tensor cos_sin_cache, bool is_neox, int[] mrope_section, bool mrope_interleaved",
           (const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& q_weight,
            const at::Tensor& k_weight, double epsilon, const at::Tensor& cos_sin_cache, bool is_neox,
            at::IntArrayRef mrope_section, bool mrope_interleaved))
// qk_norm_rope, then reshape_and_cache of the rotated key and value, in one launch
// (ops/reference.py qk_norm_rope_and_cache).
SPLITVL_OP(qk_norm_rope_and_cache,
           "Tensor positions, Tensor! query, Tensor! key, Tensor value, Tensor q_weight, Tensor k_weight, "
           "float epsilon, Tensor cos_sin_cache, Tensor! key_cache, Tensor! value_cache, Tensor slot_mapping, "
           "bool is_neox, int[] mrope_section, bool mrope_interleaved",
           (const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& value,
            const at::Tensor& q_weight, const at::Tensor& k_weight, double epsilon,
            const at::Tensor& cos_sin_cache, at::Tensor& key_cache, at::Tensor& value_cache,
            const at::Tensor& slot_mapping, bool is_neox, at::IntArrayRef mrope_section,
            bool mrope_interleaved))
SPLITVL_OP(silu_and_mul, "Tensor! out, Tensor input",
           (at::Tensor& out, const at::Tensor& input))
SPLITVL_OP(gelu_tanh, "Tensor! out, Tensor input", (at::Tensor& out, const at::Tensor& input))
// out = input * sigmoid(gate), the sigmoid rounded to the dtype first (Qwen3.5's attention output gate).
SPLITVL_OP(sigmoid_gate_mul, "Tensor! out, Tensor input, Tensor gate",
           (at::Tensor& out, const at::Tensor& input, const at::Tensor& gate))
SPLITVL_OP(reshape_and_cache,
           "Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, Tensor slot_mapping",
           (const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
            at::Tensor& value_cache, const at::Tensor& slot_mapping))
SPLITVL_OP(paged_attention_decode,
           "Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
           "Tensor block_tables, Tensor seq_lens, float scale",
           (at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
            const at::Tensor& value_cache, const at::Tensor& block_tables,
            const at::Tensor& seq_lens, double scale))
SPLITVL_OP(varlen_attention,
           "Tensor! out, Tensor query, Tensor? key, Tensor? value, Tensor cu_seqlens_q, "
           "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool causal, "
           "Tensor? key_cache, Tensor? value_cache, Tensor? block_tables",
           (at::Tensor& out, const at::Tensor& query, const std::optional<at::Tensor>& key,
            const std::optional<at::Tensor>& value, const at::Tensor& cu_seqlens_q,
            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
            double scale, bool causal, const std::optional<at::Tensor>& key_cache,
            const std::optional<at::Tensor>& value_cache,
            const std::optional<at::Tensor>& block_tables))
SPLITVL_OP(topk_softmax,
           "Tensor! topk_weights, Tensor! topk_ids, Tensor gating_output, bool renormalize",
           (at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& gating_output,
            bool renormalize))

// Dense linears at few rows (decode), streaming the weight once (ops/reference.py):
// out [M, N] = x [M, K] weight [N, K]^T (+ bias [N]); gate_up_silu_small:
// out [M, I] = silu(x W[:I]^T) * (x W[I:]^T) with weight [2I, K].
SPLITVL_OP(linear_small, "Tensor! out, Tensor x, Tensor weight, Tensor? bias",
           (at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias))
SPLITVL_OP(gate_up_silu_small, "Tensor! out, Tensor x, Tensor weight",
           (at::Tensor& out, const at::Tensor& x, const at::Tensor& weight))

// fused_add_rms_norm then linear_small in one launch (ops/reference.py add_rms_norm_linear_small):
// residual_out [M, K] = x + residual (out of place), out [M, N] = rms_norm(residual_out) weight^T (+ bias).
SPLITVL_OP(add_rms_norm_linear_small,
           "Tensor! out, Tensor! residual_out, Tensor x, Tensor residual, Tensor norm_weight, float epsilon, "
           "Tensor weight, Tensor? bias",
           (at::Tensor& out, at::Tensor& residual_out, const at::Tensor& x, const at::Tensor& residual,
            const at::Tensor& norm_weight, double epsilon, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias))

// MoE experts over pairs p = t * k + j sorted by expert and padded per expert to blocks
// (ops/reference_moe.py): sorted_pairs [capacity], block_experts [capacity / block],
// total_padded [1], pair_pos [T, k]; all int32.
SPLITVL_OP(moe_align,
           "Tensor! sorted_pairs, Tensor! pair_pos, Tensor! block_experts, Tensor! total_padded, "
           "Tensor topk_ids, int num_experts",
           (at::Tensor& sorted_pairs, at::Tensor& pair_pos, at::Tensor& block_experts,
            at::Tensor& total_padded, const at::Tensor& topk_ids, int64_t num_experts))
// topk_softmax then moe_align of its ids (E = gating_output's width), in one launch at decode.
SPLITVL_OP(moe_route,
           "Tensor! topk_weights, Tensor! topk_ids, Tensor! sorted_pairs, Tensor! pair_pos, "
           "Tensor! block_experts, Tensor! total_padded, Tensor gating_output, bool renormalize",
           (at::Tensor& topk_weights, at::Tensor& topk_ids, at::Tensor& sorted_pairs,
            at::Tensor& pair_pos, at::Tensor& block_experts, at::Tensor& total_padded,
            const at::Tensor& gating_output, bool renormalize))
// The router linear (fp32 logits [T, E], kept in `logits`) then moe_route, one launch at
// decode; arrivals int32 [1] is a persistent zero counter the CUDA blocks use and reset.
SPLITVL_OP(moe_gate_route,
           "Tensor! topk_weights, Tensor! topk_ids, Tensor! sorted_pairs, Tensor! pair_pos, "
           "Tensor! block_experts, Tensor! total_padded, Tensor! logits, Tensor! arrivals, "
           "Tensor x, Tensor gate_weight, bool renormalize",
           (at::Tensor& topk_weights, at::Tensor& topk_ids, at::Tensor& sorted_pairs,
            at::Tensor& pair_pos, at::Tensor& block_experts, at::Tensor& total_padded,
            at::Tensor& logits, at::Tensor& arrivals, const at::Tensor& x,
            const at::Tensor& gate_weight, bool renormalize))
SPLITVL_OP(moe_gate_up,
           "Tensor! out, Tensor x, Tensor weight, Tensor sorted_pairs, Tensor block_experts, "
           "Tensor total_padded, int top_k",
           (at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
            const at::Tensor& sorted_pairs, const at::Tensor& block_experts,
            const at::Tensor& total_padded, int64_t top_k))
SPLITVL_OP(moe_down,
           "Tensor! out, Tensor h, Tensor weight, Tensor topk_weights, Tensor sorted_pairs, "
           "Tensor block_experts, Tensor total_padded",
           (at::Tensor& out, const at::Tensor& h, const at::Tensor& weight,
            const at::Tensor& topk_weights, const at::Tensor& sorted_pairs,
            const at::Tensor& block_experts, const at::Tensor& total_padded))
// Pairs sorted by expert without padding: expert e's rows end at expert_offsets[e] (the
// offsets of a grouped GEMM); row_tokens [T*k] is each row's token (0 in unused rows).
SPLITVL_OP(moe_permute,
           "Tensor! row_tokens, Tensor! pair_pos, Tensor! expert_offsets, Tensor topk_ids, "
           "int num_experts",
           (at::Tensor& row_tokens, at::Tensor& pair_pos, at::Tensor& expert_offsets,
            const at::Tensor& topk_ids, int64_t num_experts))
// topk_weights [T, k] fp32 or None (moe_down already weighted the rows).
SPLITVL_OP(moe_combine, "Tensor! out, Tensor y, Tensor pair_pos, Tensor? topk_weights",
           (at::Tensor& out, const at::Tensor& y, const at::Tensor& pair_pos,
            const std::optional<at::Tensor>& topk_weights))

// moe_combine into out, then fused_add_rms_norm(out, residual, weight, epsilon): residual +=
// the combine (both rounded as the two ops round), out = rms_norm(residual) * weight.
SPLITVL_OP(moe_combine_add_rms_norm,
           "Tensor! out, Tensor! residual, Tensor y, Tensor pair_pos, Tensor? topk_weights, "
           "Tensor weight, float epsilon",
           (at::Tensor& out, at::Tensor& residual, const at::Tensor& y, const at::Tensor& pair_pos,
            const std::optional<at::Tensor>& topk_weights, const at::Tensor& weight,
            double epsilon))

// A MoE layer's second half at decode (no shared expert, TP=1), one launch on CUDA for few
// tokens: fused_add_rms_norm(x, residual) (residual updated, x read only) -> router linear ->
// moe_route -> moe_gate_up -> moe_down -> moe_combine into out [T, H]; barrier int32 [1] is
// the persistent counter of the CUDA kernel's grid barrier (moe_decode_block.h: checks, chain).
SPLITVL_OP(moe_decode_block,
           "Tensor! out, Tensor! residual, Tensor! barrier, Tensor x, Tensor norm_weight, "
           "float epsilon, Tensor gate_weight, Tensor gate_up_proj, Tensor down_proj, int top_k, "
           "bool renormalize",
           (at::Tensor& out, at::Tensor& residual, at::Tensor& barrier, const at::Tensor& x,
            const at::Tensor& norm_weight, double epsilon, const at::Tensor& gate_weight,
            const at::Tensor& gate_up_proj, const at::Tensor& down_proj, int64_t top_k,
            bool renormalize))

// Qwen3.5 linear attention (Gated DeltaNet); shared argument checks in linear_attn_checks.h.
// x [T, dim] token-major; conv_states [num_slots, dim, width-1]; sequence b uses slot
// state_indices[b] (< 0: none, zero start, state discarded). q, k [T, Hk, Dk]; v [T, Hv, Dv];
// g, beta [T, Hv] fp32; states [num_slots, Hv, Dk, Dv] fp32.
SPLITVL_OP(causal_conv1d_fwd,
           "Tensor! out, Tensor x, Tensor weight, Tensor? bias, Tensor! conv_states, "
           "Tensor cu_seqlens, Tensor state_indices, Tensor? has_initial_state, bool silu",
           (at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
            const at::Tensor& cu_seqlens, const at::Tensor& state_indices,
            const std::optional<at::Tensor>& has_initial_state, bool silu))
SPLITVL_OP(causal_conv1d_update,
           "Tensor! out, Tensor x, Tensor weight, Tensor? bias, Tensor! conv_states, "
           "Tensor state_indices, bool silu",
           (at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
            const at::Tensor& state_indices, bool silu))
SPLITVL_OP(gated_delta_rule_chunked,
           "Tensor! out, Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor cu_seqlens, "
           "Tensor! states, Tensor state_indices, Tensor? has_initial_state, bool use_qk_l2norm",
           (at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& g, const at::Tensor& beta, const at::Tensor& cu_seqlens,
            at::Tensor& states, const at::Tensor& state_indices,
            const std::optional<at::Tensor>& has_initial_state, bool use_qk_l2norm))
SPLITVL_OP(gated_delta_rule_recurrent,
           "Tensor! out, Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor! states, "
           "Tensor state_indices, bool use_qk_l2norm",
           (at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& g, const at::Tensor& beta, at::Tensor& states,
            const at::Tensor& state_indices, bool use_qk_l2norm))
SPLITVL_OP(gated_rms_norm, "Tensor! out, Tensor x, Tensor z, Tensor weight, float eps",
           (at::Tensor& out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
            double eps))
// ba [T, 2 * Hv] (b then a, unit column stride); A_log, dt_bias [Hv] fp32; g, beta [T, Hv] fp32.
SPLITVL_OP(gdn_gating, "Tensor! g, Tensor! beta, Tensor ba, Tensor A_log, Tensor dt_bias",
           (at::Tensor& g, at::Tensor& beta, const at::Tensor& ba, const at::Tensor& A_log,
            const at::Tensor& dt_bias))
// One Gated DeltaNet decode step between the projections (gating, conv update + SiLU, recurrent
// step, gated norm): proj [B, conv_dim + Hv Dv + 2 Hv] = q | k | v | z | b | a columns;
// conv_weight [conv_dim, W]; norm_weight [Dv]; out [B, Hv, Dv].
SPLITVL_OP(gated_delta_net_decode,
           "Tensor! out, Tensor proj, Tensor conv_weight, Tensor! conv_states, Tensor A_log, "
           "Tensor dt_bias, Tensor! recurrent_states, Tensor state_indices, Tensor norm_weight, "
           "float eps, bool use_qk_l2norm",
           (at::Tensor& out, const at::Tensor& proj, const at::Tensor& conv_weight,
            at::Tensor& conv_states, const at::Tensor& A_log, const at::Tensor& dt_bias,
            at::Tensor& recurrent_states, const at::Tensor& state_indices,
            const at::Tensor& norm_weight, double eps, bool use_qk_l2norm))

// One-shot all-reduce over CUDA IPC for small rows (CUDA only; the CPU kernels raise).
// buffer: this rank's registered uint8 [4096 + 2 * slot bytes] CUDA buffer (layout:
// cuda/custom_allreduce.cu); handle: uint8 [72] (IPC handle + offset), handles [world, 72];
// rank_ptrs [world, 2] int64: each rank's buffer address here, and the mapping to close (0: own).
SPLITVL_OP(custom_ar_export, "Tensor! handle, Tensor buffer",
           (at::Tensor& handle, const at::Tensor& buffer))
SPLITVL_OP(custom_ar_open, "Tensor! rank_ptrs, Tensor handles, Tensor buffer, int rank",
           (at::Tensor& rank_ptrs, const at::Tensor& handles, const at::Tensor& buffer, int64_t rank))
SPLITVL_OP(custom_ar_close, "Tensor rank_ptrs, Tensor buffer",
           (const at::Tensor& rank_ptrs, const at::Tensor& buffer))
// x [...] bf16/fp16, contiguous, at most slot bytes: summed over the ranks in place, in rank order.
SPLITVL_OP(custom_all_reduce, "Tensor! x, Tensor buffer, int[] rank_ptrs, int rank",
           (at::Tensor& x, const at::Tensor& buffer, at::IntArrayRef rank_ptrs, int64_t rank))
