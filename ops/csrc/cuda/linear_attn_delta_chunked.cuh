// Host entry of the chunk-parallel gated delta rule prefill (linear_attn_delta_chunked.cu).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace splitvl {

// Sequences of at most this many tokens (a mixed step's decode rows) are left to the sequential
// kernel: in the chunked kernels each would cost a full 64-row chunk in every phase and crowd the
// state pass's CTA slots ahead of the long prompts; the sequential kernel runs all of them in one
// launch at a few microseconds a token.
constexpr int kChunkedShortLen = 4;

// Runs the chunked prefill on validated arguments (check_delta_rule_args) for the sequences longer
// than short_len tokens and returns true (the caller runs the others: output rows and slot state
// untouched here), or returns false without launching anything when the head dims or the shared
// memory they need are beyond it (the caller then runs every sequence on the sequential kernel).
bool launch_gated_delta_rule_chunked(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                                     const at::Tensor& cu_seqlens, at::Tensor& states,
                                     const at::Tensor& state_indices, const bool* has_init,
                                     int64_t batch, bool l2norm, int short_len);

}  // namespace splitvl
