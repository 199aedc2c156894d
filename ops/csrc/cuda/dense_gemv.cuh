// What linear_small's kernel (dense_gemv.cu) shares with add_rms_norm_linear_small's
// (norm_gemv.cu): the launch arguments, the cluster reduction of a slab's partial sums and
// its store, the K split and the fast-path test. Both kernels stream and sum the same way,
// so equal A values give equal outputs bit for bit.
#pragma once

#include <cooperative_groups.h>

#include "gemv_stream.cuh"

namespace splitvl::cuda::gemv {

constexpr int kMaxSplits = 8;               // the portable cluster size
constexpr int kFrag = kTiles * 4 * 32;      // a warp's accumulators: one CTA's 16 x 32 outputs

template <typename T>
struct DenseArgs {
  T* out;          // [M, n] contiguous
  const T* x;      // [M, K], rows x_stride apart
  const T* w;      // [n or 2n, K] contiguous
  const T* bias;   // [n] or nullptr
  int64_t x_stride;
  int m, k_dim, n, splits;
};

// Element e of a CTA's accumulators: (n-tile, fragment register, lane).
struct FragPos {
  int row, col;  // within the 16-row block; slab column (gated: of the gate half)
};
__device__ __forceinline__ FragPos frag_pos(int e) {
  const int nt = e / 128, i = (e / 32) % 4, lane = e % 32;
  return {(lane >> 2) + (i >= 2 ? 8 : 0), 8 * nt + 2 * (lane & 3) + (i & 1)};
}

// Sum of accumulator e over the kWarps warps of every CTA in the cluster.
__device__ __forceinline__ float cluster_sum(float* partial, int e, int splits) {
  float sum = 0.f;
  for (int r = 0; r < splits; ++r) {
    const float* src = partial;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    if (splits > 1) src = cooperative_groups::this_cluster().map_shared_rank(partial, r);
#endif
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += src[w * kFrag + e];
  }
  return sum;
}

__device__ __forceinline__ void cluster_barrier(int splits) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  if (splits > 1) {
    cooperative_groups::this_cluster().sync();
    return;
  }
#endif
  __syncthreads();
}

// The cluster's CTAs share the slab's outputs out; CTA r writes elements r * 128 + tid,
// stepping by the cluster's threads. Gated: element e < kFrag / 2 is a gate column,
// e + kFrag / 2 its up column (n-tiles 2, 3).
template <typename T, bool GATED>
__device__ __forceinline__ void reduce_and_store(const DenseArgs<T>& p, float* partial, int rank,
                                                 int row0, int col0) {
  cluster_barrier(p.splits);  // every CTA's partials are written
  constexpr int kOut = GATED ? kFrag / 2 : kFrag;
  for (int e = rank * blockDim.x + threadIdx.x; e < kOut; e += p.splits * blockDim.x) {
    const FragPos pos = frag_pos(e);
    const int row = row0 + pos.row, col = col0 + pos.col;
    const float v = cluster_sum(partial, e, p.splits);
    float y;
    if constexpr (GATED) {
      y = silu(v) * cluster_sum(partial, e + kFrag / 2, p.splits);
    } else {
      y = p.bias != nullptr && col < p.n ? v + to_float(p.bias[col]) : v;
    }
    if (row < p.m && col < p.n) p.out[int64_t(row) * p.n + col] = from_float<T>(y);
  }
  cluster_barrier(p.splits);  // no CTA leaves while another still reads its shared memory
}

// K splits per slab: double while the grid is under two CTAs an SM (~4 MB of loads in
// flight) and every warp keeps a chunk (0.8B's down, K = 3584 over 32 slabs: 8 splits).
inline int choose_splits(int64_t ctas, int chunks, bool clusters) {
  if (!clusters) return 1;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int splits = 1;
  while (splits < kMaxSplits && ctas * splits < 2 * sms &&
         chunks >= 2 * splits * kWarps)
    splits *= 2;
  return splits;
}

// Whether x [M, K] and weight [N, K] take the weight-streaming kernel (else the ATen path).
inline bool streams(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() != at::kFloat && x.size(1) % 8 == 0 && (x.stride(1) == 1 || x.size(1) <= 1) &&
         x.stride(0) % 8 == 0 && weight.is_contiguous() && is_aligned16(x.data_ptr()) &&
         is_aligned16(weight.data_ptr());
}

}  // namespace splitvl::cuda::gemv
