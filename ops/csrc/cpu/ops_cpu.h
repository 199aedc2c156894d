// CPU kernels of torch.ops.splitvl, registered by ops/csrc/torch_bindings.cpp next to
// their schema. Signatures follow the schema.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace splitvl::cpu {

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon);

void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox, at::IntArrayRef mrope_section,
                      bool mrope_interleaved);

void silu_and_mul(at::Tensor& out, const at::Tensor& input);
void gelu_tanh(at::Tensor& out, const at::Tensor& input);

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping);

void paged_attention_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale);
void varlen_attention(at::Tensor& out, const at::Tensor& query,
                      const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                      int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
                      const std::optional<at::Tensor>& key_cache,
                      const std::optional<at::Tensor>& value_cache,
                      const std::optional<at::Tensor>& block_tables);

void topk_softmax(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& gating_output,
                  bool renormalize);

// MoE experts (semantics: ops/reference_moe.py).
void moe_align(at::Tensor& sorted_pairs, at::Tensor& pair_pos, at::Tensor& block_experts,
               at::Tensor& total_padded, const at::Tensor& topk_ids, int64_t num_experts);
void moe_gate_up(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                 const at::Tensor& sorted_pairs, const at::Tensor& block_experts,
                 const at::Tensor& total_padded, int64_t top_k);
void moe_down(at::Tensor& out, const at::Tensor& h, const at::Tensor& weight,
              const at::Tensor& topk_weights, const at::Tensor& sorted_pairs,
              const at::Tensor& block_experts, const at::Tensor& total_padded);
void moe_combine(at::Tensor& out, const at::Tensor& y, const at::Tensor& pair_pos);


// Qwen3.5 linear attention (Gated DeltaNet); shared argument checks in ../linear_attn_checks.h.
void causal_conv1d_fwd(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                       const at::Tensor& cu_seqlens, const at::Tensor& state_indices,
                       const std::optional<at::Tensor>& has_initial_state, bool silu);
void causal_conv1d_update(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                          const at::Tensor& state_indices, bool silu);
void gated_delta_rule_chunked(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                              const at::Tensor& cu_seqlens, at::Tensor& states,
                              const at::Tensor& state_indices,
                              const std::optional<at::Tensor>& has_initial_state,
                              bool use_qk_l2norm);
void gated_delta_rule_recurrent(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                                at::Tensor& states, const at::Tensor& state_indices,
                                bool use_qk_l2norm);
void gated_rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& z,
                    const at::Tensor& weight, double eps);

}  // namespace splitvl::cpu
