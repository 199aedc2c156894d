// L2 cache hints of the decode kernels (sm_90 and newer; no-ops before): bulk prefetches into
// L2 and an evict-first policy for weights streamed once per step.
#pragma once

#include <cstdint>

namespace splitvl::cuda {

// Asks L2 for [p, p + bytes): p 16-byte aligned, bytes a multiple of 16. Asynchronous, nothing
// waits for it; a hint that changes timing only.
__device__ __forceinline__ void l2_prefetch_bytes(const void* p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// A cache policy whose lines L2 evicts first: for weight rows read once, so that what was
// prefetched for a later phase stays.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
  return policy;
}

}  // namespace splitvl::cuda
