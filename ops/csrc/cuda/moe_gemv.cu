// Expert GEMMs for 16-row blocks (few pairs per expert: decode and small batches),
// at memory speed. Semantics: ops/reference_moe.py (moe_gate_up, moe_down).
//
// A block holds at most 16 real rows, so the weights are the only bytes that
// matter and each is used by at most 16 rows: the work is a weight stream. Each
// CTA owns one block and a narrow slab of weight rows (gated: 16 gate + the 16
// matching up rows; else 32 rows) over the whole K; its 4 warps split K and are
// summed in shared memory at the end. Weights go straight from global memory
// into mma.sync B fragments with 16-byte streaming loads (no shared-memory
// staging, no pipeline fill), kUnroll chunks per warp in flight. Narrow slabs
// give many equal CTAs: at one token (8 blocks) gate_up launches 384 CTAs and
// down 512, which all fit on the GPU at once, so every SM streams until the end
// instead of the last wave running half empty. Registers (< 128 for 4 CTAs an SM)
// bound the loads in flight.
//
// K order inside a 32-wide chunk: a lane loads 8 consecutive elements (16 bytes)
// of its weight row and of its A rows; mma k-step s uses elements 4s..4s+3 of
// them as the fragment's k pairs (2t4, 2t4+1) and (2t4+8, 2t4+9). A and B use the
// same permutation of k, so the dot products are unchanged.
#include "moe_gemm_common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kTiles = 4;   // n-tiles of 8 weight rows per CTA (gated: 2 gate + 2 up)
// 32-wide k chunks per warp in flight: 2 KB per warp and chunk, so 16 KB per CTA and
// 6 MB over the 384 CTAs of a one-token gate_up (Little's law at ~4.2 TB/s and ~1 us
// asks ~4 MB); kWarps * kUnroll divides the chunk counts of H 2048 and I 768.
constexpr int kUnroll = 2;
constexpr int kChunk = 32;

// Streaming weight load: bypasses L1 (read once), asks L2 for the whole 256-byte line.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// A rows are small and shared by the CTAs of one block: read through L1.
__device__ __forceinline__ uint4 load_cached(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Global weight row of n-tile nt for fragment row g (-1 beyond n). Gated: tiles 0, 1
// are gate rows of columns col0 .. col0 + 15, tiles 2, 3 the up rows of the same columns.
template <bool GATED>
__device__ __forceinline__ int tile_weight_row(int nt, int g, int col0, int n) {
  if constexpr (GATED) {
    const int col = col0 + 8 * (nt & 1) + g;
    return col < n ? (nt < 2 ? col : n + col) : -1;
  } else {
    const int col = col0 + 8 * nt + g;
    return col < n ? col : -1;
  }
}

struct Chunk {
  uint4 w[kTiles];
  uint4 a[2];  // A rows g and g + 8
};

// acc[nt] += A(16 rows) x W(tile nt) over one loaded chunk (two mma k-steps).
template <typename T>
__device__ __forceinline__ void mma_chunk(float (&acc)[kTiles][4], const Chunk& c) {
  const unsigned a0[4] = {c.a[0].x, c.a[1].x, c.a[0].y, c.a[1].y};
  const unsigned a1[4] = {c.a[0].z, c.a[1].z, c.a[0].w, c.a[1].w};
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    mma16816<T>(acc[nt], a0, c.w[nt].x, c.w[nt].y);
    mma16816<T>(acc[nt], a1, c.w[nt].z, c.w[nt].w);
  }
}

// This warp's partial sums over its chunks: warp w takes chunks w, w + kWarps, ...
// so the CTA reads kWarps * kUnroll consecutive chunks of every row per round.
template <typename T>
__device__ __forceinline__ void stream_k(float (&acc)[kTiles][4], const T* const (&w_rows)[kTiles],
                                         const T* a0, const T* a1, int k_dim) {
  const int warp = threadIdx.x >> 5, t4 = threadIdx.x & 3;
  const int chunks = (k_dim + kChunk - 1) / kChunk;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int first = warp; first < chunks; first += kWarps * kUnroll) {
    Chunk c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (first + u * kWarps) * kChunk + 8 * t4;
      const bool in = k < k_dim;  // K % 8 == 0: a lane's 8 elements are all in or all out
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt)
        c[u].w[nt] = in && w_rows[nt] != nullptr ? load_stream(w_rows[nt] + k) : zero;
      c[u].a[0] = in && a0 != nullptr ? load_cached(a0 + k) : zero;
      c[u].a[1] = in && a1 != nullptr ? load_cached(a1 + k) : zero;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) mma_chunk<T>(acc, c[u]);
  }
}

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
    moe_gemv_kernel(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ w,
                    const float* __restrict__ pair_weights, BlockArgs args, int top_k, int k_dim,
                    int n) {
  __shared__ const T* a_rows[16];
  __shared__ int row_pairs[16];
  __shared__ float partial[kWarps - 1][kTiles][4][32];
  const int expert = block_rows<T, 16>(args, a, top_k, k_dim, a_rows, row_pairs);
  if (expert < 0) return;  // uniform over the CTA
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const int col0 = blockIdx.y * (GATED ? 4 * kTiles : 8 * kTiles);
  const T* w_expert = w + int64_t(expert) * (GATED ? 2 : 1) * n * k_dim;
  const T* w_rows[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    const int row = tile_weight_row<GATED>(nt, g, col0, n);
    w_rows[nt] = row >= 0 ? w_expert + int64_t(row) * k_dim : nullptr;
  }
  float acc[kTiles][4] = {};
  stream_k<T>(acc, w_rows, a_rows[g], a_rows[g + 8], k_dim);

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
  const int cols = GATED ? 4 * kTiles : 8 * kTiles;
  const dim3 grid(blocks, (n + cols - 1) / cols);
  moe_gemv_kernel<T, GATED><<<grid, kWarps * 32, 0, stream>>>(out, a, w, pair_weights, args,
                                                              top_k, k_dim, n);
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
