// Schemas and CPU registrations of the Qwen3.5 linear-attention ops (a fragment
// of the splitvl library; the CUDA kernels register themselves in
// cuda/linear_attn_*.cu). Semantics: ops/reference_linear_attn.py.
#include <torch/library.h>

#include "linear_attn.h"

TORCH_LIBRARY_FRAGMENT(splitvl, m) {
  // x [T, dim] token-major; conv_states [num_slots, dim, width-1]; sequence b
  // uses slot state_indices[b] (< 0: none, zero start, state discarded).
  m.def(
      "causal_conv1d_fwd(Tensor! out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor! conv_states, Tensor cu_seqlens, Tensor state_indices, "
      "Tensor? has_initial_state, bool silu) -> ()");
  m.def(
      "causal_conv1d_update(Tensor! out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor! conv_states, Tensor state_indices, bool silu) -> ()");
  // q, k [T, Hk, Dk]; v [T, Hv, Dv]; g, beta [T, Hv] fp32; states [num_slots, Hv, Dk, Dv] fp32.
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
  m.impl("causal_conv1d_fwd", &splitvl::causal_conv1d_fwd_cpu);
  m.impl("causal_conv1d_update", &splitvl::causal_conv1d_update_cpu);
  m.impl("gated_delta_rule_chunked", &splitvl::gated_delta_rule_chunked_cpu);
  m.impl("gated_delta_rule_recurrent", &splitvl::gated_delta_rule_recurrent_cpu);
  m.impl("gated_rms_norm", &splitvl::gated_rms_norm_cpu);
}
