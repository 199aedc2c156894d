// The weight stream of the 16-row GEMV kernels (moe_gemv.cu: expert blocks;
// dense_gemv.cu: a plain linear at few rows).
//
// With at most 16 rows the weights are the only bytes that matter and each is used
// by at most 16 rows: the work is a weight stream. A CTA owns a narrow slab of
// weight rows (kTiles n-tiles of 8: gated, 16 gate rows and the 16 matching up
// rows; else 32 rows); its kWarps warps split the slab's K range and are summed at
// the end. Weights go straight from global memory into mma.sync B fragments with
// 16-byte streaming loads (no shared-memory staging, no pipeline fill), kUnroll
// chunks per warp in flight. Registers (< 128 for 4 CTAs an SM) bound the loads
// in flight.
//
// K order inside a 32-wide chunk: a lane loads 8 consecutive elements (16 bytes)
// of its weight row and of its A rows; mma k-step s uses elements 4s..4s+3 of
// them as the fragment's k pairs (2t4, 2t4+1) and (2t4+8, 2t4+9). A and B use the
// same permutation of k, so the dot products are unchanged.
//
// Accumulator (nt, i) of lane (g = lane / 4, t4 = lane % 4) is A row g + 8 (i >= 2)
// and column 8 nt + 2 t4 + (i & 1) of the slab's n-tiles.
#pragma once

#include "mma_common.cuh"
#include "pdl.cuh"

namespace splitvl::cuda::gemv {

constexpr int kWarps = 4;
constexpr int kTiles = 4;  // n-tiles of 8 weight rows per CTA (gated: 2 gate + 2 up)
// 32-wide k chunks per warp in flight: 2 KB per warp and chunk, so 16 KB per CTA;
// ~260 CTAs in flight cover Little's law at ~4.2 TB/s and ~1 us (~4 MB).
constexpr int kUnroll = 2;
constexpr int kChunk = 32;

// Output columns of one CTA's slab.
template <bool GATED>
constexpr int kSlabCols = GATED ? 4 * kTiles : 8 * kTiles;

// Streaming weight load: bypasses L1 (read once), asks L2 for the whole 256-byte line.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// A rows (activations) are small and shared by the CTAs of one slab row: read from L2 with a
// coherent load. Not ld.global.nc (__ldg): the non-coherent path is defined only for data that
// is read-only for the kernel's whole lifetime, and under PDL that lifetime starts while the
// previous kernel is still writing A; not L1 either, which no other SM's writes invalidate.
__device__ __forceinline__ uint4 load_cached(const void* p) {
  return __ldcg(reinterpret_cast<const uint4*>(p));
}

// Weight row of n-tile nt for fragment row g (-1 beyond n). Gated (w [2n, K]): tiles
// 0, 1 are gate rows of columns col0 .. col0 + 15, tiles 2, 3 the up rows of the same
// columns; else tile nt holds rows col0 + 8 nt .. + 7.
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

// This warp's partial sums over chunks [begin, end) of K: warp w takes chunks
// begin + w, begin + w + kWarps, ... so the CTA reads kWarps * kUnroll consecutive
// chunks of every row per round. Null rows (beyond n, or padding A rows) read as 0.
// Needs K % 8 == 0 (a lane's 8 elements are all in or all out) and 16-byte aligned rows.
// PDL: the weights are read-only, so the first round's weight loads are issued before
// pdl_wait() (pdl.cuh) and overlap the previous kernel's tail; A (an activation) is read
// after it. Every thread has waited when this returns.
template <typename T, bool PDL = false>
__device__ __forceinline__ void stream_k(float (&acc)[kTiles][4], const T* const (&w_rows)[kTiles],
                                         const T* a0, const T* a1, int k_dim, int begin, int end) {
  const int warp = threadIdx.x >> 5, t4 = threadIdx.x & 3;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  bool waited = !PDL;
  for (int first = begin + warp; first < end; first += kWarps * kUnroll) {
    Chunk c[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int chunk = first + u * kWarps;
      const int k = chunk * kChunk + 8 * t4;
      const bool in = chunk < end && k < k_dim;
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt)
        c[u].w[nt] = in && w_rows[nt] != nullptr ? load_stream(w_rows[nt] + k) : zero;
    }
    if (!waited) {
      pdl_wait();
      pdl_launch_dependents();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int chunk = first + u * kWarps;
      const int k = chunk * kChunk + 8 * t4;
      const bool in = chunk < end && k < k_dim;
      c[u].a[0] = in && a0 != nullptr ? load_cached(a0 + k) : zero;
      c[u].a[1] = in && a1 != nullptr ? load_cached(a1 + k) : zero;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) mma_chunk<T>(acc, c[u]);
  }
  if (!waited) {  // a warp with no chunk still writes outputs afterwards
    pdl_wait();
    pdl_launch_dependents();
  }
}

}  // namespace splitvl::cuda::gemv
