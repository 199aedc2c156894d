// Block-wide matrix product on shared-memory tiles: tensor cores (WMMA, fp32
// accumulation) for 16-bit operands, fp32 FMA for float operands (the exact path
// the fp32 tests check the surrounding algorithm with).
#pragma once

#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace splitvl {

// C[M, N] = (accumulate ? c_scale C : 0) + A[M, K] B[K, N]; C is fp32 in shared memory.
// A(m, k) = kATrans ? A[k * lda + m] : A[m * lda + k]
// B(k, n) = kBTrans ? B[n * ldb + k] : B[k * ldb + n]
// 16-bit T: M, N, K multiples of 16, lda/ldb multiples of 8, ldc a multiple of 4 and
// every base pointer 32-byte aligned; warps take 16x16 output tiles round robin.
// Warps [first_warp, first_warp + num_warps) call it (num_warps 0: every warp of the block),
// so the other warps can do independent work meanwhile. It does not sync: callers sync
// before reading C (and between two calls that accumulate into the same C).
template <bool kATrans, bool kBTrans, typename T>
__device__ __forceinline__ void block_mm(float* C, int ldc, const T* A, int lda, const T* B, int ldb,
                                         int M, int N, int K, bool accumulate, int first_warp = 0,
                                         int num_warps = 0, float c_scale = 1.f) {
  const int warps = num_warps > 0 ? num_warps : static_cast<int>(blockDim.x / 32);
  if constexpr (std::is_same_v<T, float>) {
    const int tid = static_cast<int>(threadIdx.x) - 32 * first_warp;
    for (int idx = tid; idx < M * N; idx += 32 * warps) {
      const int m = idx / N, n = idx % N;
      float acc = accumulate ? c_scale * C[m * ldc + n] : 0.f;
      for (int kk = 0; kk < K; ++kk) {
        const float a = kATrans ? A[kk * lda + m] : A[m * lda + kk];
        const float b = kBTrans ? B[n * ldb + kk] : B[kk * ldb + n];
        acc = fmaf(a, b, acc);
      }
      C[m * ldc + n] = acc;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using ALayout = std::conditional_t<kATrans, wmma::col_major, wmma::row_major>;
    using BLayout = std::conditional_t<kBTrans, wmma::col_major, wmma::row_major>;
    const int warp = static_cast<int>(threadIdx.x / 32) - first_warp;
    const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
    for (int tile = warp; tile < tiles; tile += warps) {
      const int m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if (accumulate) {
        wmma::load_matrix_sync(acc, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
        if (c_scale != 1.f) {
#pragma unroll
          for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= c_scale;
        }
      } else {
        wmma::fill_fragment(acc, 0.f);
      }
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
        wmma::load_matrix_sync(a, kATrans ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
        wmma::load_matrix_sync(b, kBTrans ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(C + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
    }
  }
}

}  // namespace splitvl
