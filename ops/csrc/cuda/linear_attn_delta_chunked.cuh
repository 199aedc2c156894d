// Host entry of the chunk-parallel gated delta rule prefill (linear_attn_delta_chunked.cu).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace splitvl {

// Runs the chunked prefill on validated arguments (check_delta_rule_args) and returns true,
// or returns false without launching anything when the head dims or the shared memory they
// need are beyond it (the caller then runs the sequential kernel).
bool launch_gated_delta_rule_chunked(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                                     const at::Tensor& cu_seqlens, at::Tensor& states,
                                     const at::Tensor& state_indices, const bool* has_init,
                                     int64_t batch, bool l2norm);

}  // namespace splitvl
