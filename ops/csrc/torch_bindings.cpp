// The splitvl op library: every op's schema (Tensor! marks what an op writes)
// and its CPU kernel. The CUDA kernels register in cuda/registration.cu.
// Semantics: ops/reference.py, ops/reference_linear_attn.py.
#include <torch/library.h>

#include "cpu/ops_cpu.h"

TORCH_LIBRARY(splitvl, m) {
  m.def("rms_norm(Tensor! out, Tensor input, Tensor weight, float epsilon) -> ()");
  m.def("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()");
  m.def(
      "rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
      "Tensor cos_sin_cache, bool is_neox, int[] mrope_section, bool mrope_interleaved) -> ()");
  m.def("silu_and_mul(Tensor! out, Tensor input) -> ()");
  m.def("gelu_tanh(Tensor! out, Tensor input) -> ()");
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
      "Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention_decode(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale) -> ()");
  m.def(
      "varlen_attention(Tensor! out, Tensor query, Tensor? key, Tensor? value, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float scale, bool causal, Tensor? key_cache, Tensor? value_cache, "
      "Tensor? block_tables) -> ()");
  m.def(
      "topk_softmax(Tensor! topk_weights, Tensor! topk_ids, Tensor gating_output, "
      "bool renormalize) -> ()");
  // MoE experts over pairs p = t * k + j sorted by expert and padded per expert to
  // blocks (ops/reference_moe.py): sorted_pairs [capacity], block_experts
  // [capacity / block], total_padded [1], pair_pos [T, k]; all int32.
  m.def(
      "moe_align(Tensor! sorted_pairs, Tensor! pair_pos, Tensor! block_experts, "
      "Tensor! total_padded, Tensor topk_ids, int num_experts) -> ()");
  m.def(
      "moe_gate_up(Tensor! out, Tensor x, Tensor weight, Tensor sorted_pairs, "
      "Tensor block_experts, Tensor total_padded, int top_k) -> ()");
  m.def(
      "moe_down(Tensor! out, Tensor h, Tensor weight, Tensor topk_weights, Tensor sorted_pairs, "
      "Tensor block_experts, Tensor total_padded) -> ()");
  m.def("moe_combine(Tensor! out, Tensor y, Tensor pair_pos) -> ()");
  // Qwen3.5 linear attention. x [T, dim] token-major; conv_states [num_slots, dim,
  // width-1]; sequence b uses slot state_indices[b] (< 0: none, zero start, state
  // discarded). q, k [T, Hk, Dk]; v [T, Hv, Dv]; g, beta [T, Hv] fp32; states
  // [num_slots, Hv, Dk, Dv] fp32.
  m.def(
      "causal_conv1d_fwd(Tensor! out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor! conv_states, Tensor cu_seqlens, Tensor state_indices, "
      "Tensor? has_initial_state, bool silu) -> ()");
  m.def(
      "causal_conv1d_update(Tensor! out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor! conv_states, Tensor state_indices, bool silu) -> ()");
  m.def(
      "gated_delta_rule_chunked(Tensor! out, Tensor q, Tensor k, Tensor v, Tensor g, "
      "Tensor beta, Tensor cu_seqlens, Tensor! states, Tensor state_indices, "
      "Tensor? has_initial_state, bool use_qk_l2norm) -> ()");
  m.def(
      "gated_delta_rule_recurrent(Tensor! out, Tensor q, Tensor k, Tensor v, Tensor g, "
      "Tensor beta, Tensor! states, Tensor state_indices, bool use_qk_l2norm) -> ()");
  m.def("gated_rms_norm(Tensor! out, Tensor x, Tensor z, Tensor weight, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(splitvl, CPU, m) {
  m.impl("rms_norm", &splitvl::cpu::rms_norm);
  m.impl("fused_add_rms_norm", &splitvl::cpu::fused_add_rms_norm);
  m.impl("rotary_embedding", &splitvl::cpu::rotary_embedding);
  m.impl("silu_and_mul", &splitvl::cpu::silu_and_mul);
  m.impl("gelu_tanh", &splitvl::cpu::gelu_tanh);
  m.impl("reshape_and_cache", &splitvl::cpu::reshape_and_cache);
  m.impl("paged_attention_decode", &splitvl::cpu::paged_attention_decode);
  m.impl("varlen_attention", &splitvl::cpu::varlen_attention);
  m.impl("topk_softmax", &splitvl::cpu::topk_softmax);
  m.impl("moe_align", &splitvl::cpu::moe_align);
  m.impl("moe_gate_up", &splitvl::cpu::moe_gate_up);
  m.impl("moe_down", &splitvl::cpu::moe_down);
  m.impl("moe_combine", &splitvl::cpu::moe_combine);
  m.impl("causal_conv1d_fwd", &splitvl::cpu::causal_conv1d_fwd);
  m.impl("causal_conv1d_update", &splitvl::cpu::causal_conv1d_update);
  m.impl("gated_delta_rule_chunked", &splitvl::cpu::gated_delta_rule_chunked);
  m.impl("gated_delta_rule_recurrent", &splitvl::cpu::gated_delta_rule_recurrent);
  m.impl("gated_rms_norm", &splitvl::cpu::gated_rms_norm);
}
