// Registers the CUDA kernels on the splitvl library (schema: torch_bindings.cpp).
#include <torch/library.h>

#include "ops.cuh"

TORCH_LIBRARY_IMPL(splitvl, CUDA, m) {
  m.impl("rms_norm", &splitvl::cuda::rms_norm);
  m.impl("fused_add_rms_norm", &splitvl::cuda::fused_add_rms_norm);
  m.impl("rotary_embedding", &splitvl::cuda::rotary_embedding);
  m.impl("silu_and_mul", &splitvl::cuda::silu_and_mul);
  m.impl("gelu_tanh", &splitvl::cuda::gelu_tanh);
  m.impl("reshape_and_cache", &splitvl::cuda::reshape_and_cache);
  m.impl("paged_attention_decode", &splitvl::cuda::paged_attention_decode);
  m.impl("varlen_attention", &splitvl::cuda::varlen_attention);
  m.impl("topk_softmax", &splitvl::cuda::topk_softmax);
  m.impl("moe_align", &splitvl::cuda::moe_align);
  m.impl("moe_gate_up", &splitvl::cuda::moe_gate_up);
  m.impl("moe_down", &splitvl::cuda::moe_down);
  m.impl("moe_combine", &splitvl::cuda::moe_combine);
  m.impl("causal_conv1d_fwd", &splitvl::cuda::causal_conv1d_fwd);
  m.impl("causal_conv1d_update", &splitvl::cuda::causal_conv1d_update);
  m.impl("gated_delta_rule_chunked", &splitvl::cuda::gated_delta_rule_chunked);
  m.impl("gated_delta_rule_recurrent", &splitvl::cuda::gated_delta_rule_recurrent);
  m.impl("gated_rms_norm", &splitvl::cuda::gated_rms_norm);
}
