// Expert GEMMs for 16-row blocks (few pairs per expert: decode and small batches),
// at memory speed. Semantics: ops/reference_moe.py (moe_gate_up, moe_down).
//
// Each CTA owns one 16-row block and a narrow slab of its expert's weight rows over
// the whole K, streamed into mma fragments (gemv_stream.cuh); its 4 warps split K
// and are summed in shared memory at the end. Narrow slabs give many equal CTAs: at
// one token (8 blocks) gate_up launches 384 CTAs and down 512, which all fit on the
// GPU at once, so every SM streams until the end instead of the last wave running
// half empty.
#include "gemv_stream.cuh"
#include "moe_gemm_common.cuh"
#include "ops.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {
namespace {

using namespace gemv;

// Accumulator (nt, i) is row g + 8 * (i >= 2), column 2 * t4 + (i & 1) of n-tile nt.
template <typename T, bool GATED>
__device__ __forceinline__ void store_rows(T* out, const float (&acc)[kTiles][4],
                                           const float* pair_weights, const int* row_pairs,
                                           int col0, int n) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i >= 2 ? 8 : 0);
    const int pair = row_pairs[m];
    if (pair < 0) continue;
    T* dst = out + (row0 + m) * n;
    if constexpr (GATED) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = col0 + 8 * half + 2 * t4 + (i & 1);
        if (col < n) dst[col] = from_float<T>(silu(acc[half][i]) * acc[2 + half][i]);
      }
    } else {
      const float scale = pair_weights[pair];
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        const int col = col0 + 8 * nt + 2 * t4 + (i & 1);
        if (col < n) dst[col] = from_float<T>(acc[nt][i] * scale);
      }
    }
  }
}

template <typename T, bool GATED>
__global__ void __launch_bounds__(kWarps * 32, 4)
    moe_gemv_kernel(T* __restrict__ out, const T* a, const T* __restrict__ w,
                    const float* pair_weights, BlockArgs args, int top_k, int k_dim,
                    int n) {
  __shared__ const T* a_rows[16];
  __shared__ int row_pairs[16];
  __shared__ float partial[kWarps - 1][kTiles][4][32];
  // Which expert's weights to read depends on the routing: wait before anything (pdl.cuh).
  pdl_wait();
  pdl_launch_dependents();
  const int expert = block_rows<T, 16>(args, a, top_k, k_dim, a_rows, row_pairs);
  if (expert < 0) return;  // uniform over the CTA
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const int col0 = blockIdx.y * kSlabCols<GATED>;
  const T* w_expert = w + int64_t(expert) * (GATED ? 2 : 1) * n * k_dim;
  const T* w_rows[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    const int row = tile_weight_row<GATED>(nt, g, col0, n);
    w_rows[nt] = row >= 0 ? w_expert + int64_t(row) * k_dim : nullptr;
  }
  float acc[kTiles][4] = {};
  stream_k<T>(acc, w_rows, a_rows[g], a_rows[g + 8], k_dim, 0, (k_dim + kChunk - 1) / kChunk);

  if (warp > 0) {
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp - 1][nt][i][lane] = acc[nt][i];
  }
  __syncthreads();
  if (warp > 0) return;
#pragma unroll
  for (int other = 0; other < kWarps - 1; ++other)
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] += partial[other][nt][i][lane];
  store_rows<T, GATED>(out, acc, pair_weights, row_pairs, col0, n);
}

}  // namespace

template <typename T, bool GATED>
void launch_moe_gemv(T* out, const T* a, const T* w, const float* pair_weights,
                     const BlockArgs& args, int top_k, int k_dim, int n, int blocks,
                     cudaStream_t stream) {
  const int cols = kSlabCols<GATED>;
  const dim3 grid(blocks, (n + cols - 1) / cols);
  launch_pdl(moe_gemv_kernel<T, GATED>, grid, kWarps * 32, 0, stream, out, a, w, pair_weights, args, top_k,
             k_dim, n);
}

template void launch_moe_gemv<__half, true>(__half*, const __half*, const __half*, const float*,
                                            const BlockArgs&, int, int, int, int, cudaStream_t);
template void launch_moe_gemv<__half, false>(__half*, const __half*, const __half*, const float*,
                                             const BlockArgs&, int, int, int, int, cudaStream_t);
template void launch_moe_gemv<__nv_bfloat16, true>(__nv_bfloat16*, const __nv_bfloat16*,
                                                   const __nv_bfloat16*, const float*,
                                                   const BlockArgs&, int, int, int, int,
                                                   cudaStream_t);
template void launch_moe_gemv<__nv_bfloat16, false>(__nv_bfloat16*, const __nv_bfloat16*,
                                                    const __nv_bfloat16*, const float*,
                                                    const BlockArgs&, int, int, int, int,
                                                    cudaStream_t);

}  // namespace splitvl::cuda
