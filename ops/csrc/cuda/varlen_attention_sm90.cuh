// The Hopper (sm_90a) forward kernel of varlen_attention for bidirectional packed segments
// (the vision tower's attention); varlen_attention_sm90.cu says how it works.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_common.cuh"

namespace splitvl::cuda {

// Launches the wgmma kernel and returns true when the call qualifies: the switch is on
// (attention_sm90.h), the current device has compute capability 9.0 and runs this build's
// sm_90a kernel body, fp16/bf16, not causal, keys packed (not paged), head_dim 64, 72 or 80,
// 16-byte aligned pointers and strides, scale > 0. Otherwise it launches nothing and returns
// false (the caller runs its mma.sync kernel).
template <typename T>
bool launch_varlen_sm90(const VarlenParams<T>& p, int64_t max_seqlen_q, int64_t batch,
                        cudaStream_t stream);

// fp32 has no wgmma path.
inline bool launch_varlen_sm90(const VarlenParams<float>&, int64_t, int64_t, cudaStream_t) {
  return false;
}

}  // namespace splitvl::cuda
