// Device helpers shared by the linear-attention CUDA kernels (conv, delta rule).
#pragma once

#include <cstdint>

namespace splitvl {

// The last b in [0, batch) with starts[b] <= x: the sequence holding token (or chunk) x
// when starts are the cumulative offsets of the sequences (empty ones are skipped).
__device__ __forceinline__ int find_sequence(const int32_t* starts, int batch, int64_t x) {
  int lo = 0, hi = batch;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (starts[mid] <= x) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace splitvl
