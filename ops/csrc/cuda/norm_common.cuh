// What the norm kernels share (layernorm.cu, qk_norm_rope.cu, norm_gemv.cu): a pack's sum of
// squares and the RMSNorm weight rule.
// See ops/reference.py rms_norm.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace splitvl::cuda {

// A pack's squares summed in order, then added to a row's sum as one term: add_rms_norm_linear_small
// (norm_gemv.cu) replays fused_add_rms_norm's sums with it, so both must round alike.
template <typename T, int VEC>
__device__ __forceinline__ float sum_squares(const Pack<T, VEC>& p) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) s += to_float(p.v[j]) * to_float(p.v[j]);
  return s;
}

// A weight in T: round x*inv to T first, then multiply (transformers' Qwen3RMSNorm order).
// An fp32 weight: scale in fp32 and round once (Qwen3_5RMSNorm).
template <typename T, typename W>
__device__ __forceinline__ T scale_weight(float x, float inv, W w) {
  if constexpr (std::is_same_v<T, W>) {
    return from_float<T>(to_float(from_float<T>(x * inv)) * to_float(w));
  } else {
    return from_float<T>(x * inv * w);
  }
}

}  // namespace splitvl::cuda
