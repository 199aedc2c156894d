// Pieces shared by the two expert-GEMM paths (moe_gemm.cu: shared-memory tiles for
// many rows per expert block; moe_gemv.cu: weights straight into mma fragments for
// 16-row blocks). Semantics: ops/reference_moe.py.
#pragma once

#include "mma_common.cuh"

namespace splitvl::cuda {

// The aligned pair blocks, as moe_align wrote them.
struct BlockArgs {
  const int32_t* sorted;  // [capacity] pair per row (padding: pairs)
  const int32_t* block_experts;
  const int32_t* total;
  int pairs, block;
};

// The CTA's block: its expert (-1 when the block is unused) and each row's A
// source (nullptr for padding) and pair. a = x rows by token (top_k > 0) or h rows
// by position (top_k = 0). Threads below BM write the shared arrays; callers sync.
template <typename T, int BM>
__device__ int block_rows(const BlockArgs& args, const T* a, int top_k, int k_dim,
                          const T** a_rows, int* row_pairs) {
  const int blk = blockIdx.x;
  if (blk * BM >= *args.total) return -1;
  const int expert = args.block_experts[blk];
  if (threadIdx.x < BM) {
    const int row = blk * BM + threadIdx.x;
    const int pair = args.sorted[row];
    const bool real = pair < args.pairs;
    const int64_t src = top_k > 0 ? pair / top_k : row;
    a_rows[threadIdx.x] = real ? a + src * k_dim : nullptr;
    row_pairs[threadIdx.x] = real ? pair : -1;
  }
  return expert;
}

// The 16-row-block path (moe_gemv.cu), for 16-bit T, K % 8 == 0 and 16-byte aligned
// a and w. gated: out [capacity, n] = silu(a W_gate^T) * (a W_up^T) with w [E, 2n, K];
// else out [capacity, n] = (a W^T) * pair_weights[pair] with w [E, n, K].
template <typename T, bool GATED>
void launch_moe_gemv(T* out, const T* a, const T* w, const float* pair_weights,
                     const BlockArgs& args, int top_k, int k_dim, int n, int blocks,
                     cudaStream_t stream);

}  // namespace splitvl::cuda
