// The RMSNorm weight rule shared by the norm kernels (layernorm.cu, qk_norm_rope.cu).
// See ops/reference.py rms_norm.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace splitvl::cuda {

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
