// Dense linears at few rows (decode): linear_small and gate_up_silu_small, one
// weight-streaming launch each. Semantics: ops/reference.py.
//
// Every 16 rows of x form one block (grid z); each CTA streams a slab of 32 weight
// rows (gated: 16 gate + the 16 matching up rows) into mma fragments
// (gemv_stream.cuh). Small N gives too few slabs to keep every SM streaming (0.8B
// at N = 2048: 64; the 30B-A3B router at N = 128: 4), so a slab's K is also split
// over the CTAs of a thread-block cluster (grid x, up to 8 CTAs on sm_90): each
// CTA sums its warps' partials in its own shared memory, then the cluster's CTAs
// reduce the slab's 16 x 32 outputs together through distributed shared memory and
// write them (bias or SiLU gate fused). One launch, no workspace, no atomics, so it
// records into CUDA graphs like any kernel. Launched with PDL (pdl.cuh): the first weight
// loads overlap the previous kernel.
//
// fp32, K % 8 != 0 and unaligned rows take the ATen path (linear_small.h).
#include <cooperative_groups.h>

#include "../linear_small.h"
#include "gemv_stream.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

using namespace gemv;

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

template <typename T, bool GATED>
__global__ void __launch_bounds__(kWarps * 32, 4) dense_gemv_kernel(DenseArgs<T> p) {
  __shared__ __align__(16) float partial[kWarps * kFrag];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const int rank = blockIdx.x;  // the cluster spans grid x exactly: rank = blockIdx.x
  const int row0 = blockIdx.z * 16, col0 = blockIdx.y * kSlabCols<GATED>;
  const T* w_rows[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    const int row = tile_weight_row<GATED>(nt, g, col0, p.n);
    w_rows[nt] = row >= 0 ? p.w + int64_t(row) * p.k_dim : nullptr;
  }
  const T* a0 = row0 + g < p.m ? p.x + int64_t(row0 + g) * p.x_stride : nullptr;
  const T* a1 = row0 + g + 8 < p.m ? p.x + int64_t(row0 + g + 8) * p.x_stride : nullptr;
  const int chunks = (p.k_dim + kChunk - 1) / kChunk;
  const int per_split = (chunks + p.splits - 1) / p.splits;
  const int begin = rank * per_split, end = min(chunks, begin + per_split);
  float acc[kTiles][4] = {};
  stream_k<T, true>(acc, w_rows, a0, a1, p.k_dim, begin, end);  // waits (PDL)
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp * kFrag + (nt * 4 + i) * 32 + lane] = acc[nt][i];
  reduce_and_store<T, GATED>(p, partial, rank, row0, col0);
}

// K splits per slab: double while the grid is under two CTAs an SM (~4 MB of loads in
// flight) and every warp keeps a chunk (0.8B's down, K = 3584 over 32 slabs: 8 splits).
int choose_splits(int64_t ctas, int chunks, bool clusters) {
  if (!clusters) return 1;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int splits = 1;
  while (splits < kMaxSplits && ctas * splits < 2 * sms &&
         chunks >= 2 * splits * kWarps)
    splits *= 2;
  return splits;
}

template <typename T, bool GATED>
void launch_dense_gemv(const DenseArgs<T>& args, int64_t slabs, int64_t row_blocks,
                       cudaStream_t stream) {
  const dim3 grid(args.splits, static_cast<unsigned>(slabs), static_cast<unsigned>(row_blocks));
  launch_pdl_cluster(static_cast<unsigned>(args.splits), dense_gemv_kernel<T, GATED>, grid, kWarps * 32, 0,
                     stream, args);
}

bool streams(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() != at::kFloat && x.size(1) % 8 == 0 && (x.stride(1) == 1 || x.size(1) <= 1) &&
         x.stride(0) % 8 == 0 && weight.is_contiguous() && is_aligned16(x.data_ptr()) &&
         is_aligned16(weight.data_ptr());
}

template <bool GATED>
void run_dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const char* op) {
  check_cuda(x, op, "x");
  check_linear_small(out, x, weight, bias, GATED, op);
  if (out.numel() == 0) return;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const c10::cuda::CUDAGuard guard(x.device());
  if (!streams(x, weight)) {
    linear_small_aten(out, x, weight, bias, GATED);
    return;
  }
  const int m = static_cast<int>(x.size(0)), k_dim = static_cast<int>(x.size(1));
  const int n = static_cast<int>(out.size(1));
  const int64_t slabs = ceil_div(n, kSlabCols<GATED>), row_blocks = ceil_div(m, 16);
  SPLITVL_CHECK(slabs <= 65535 && row_blocks <= 65535, op, ": output too large for one launch, got ",
                out.sizes());
  const bool clusters = at::cuda::getCurrentDeviceProperties()->major >= 9;
  const int splits = choose_splits(slabs * row_blocks, ceil_div(k_dim, kChunk), clusters);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      const DenseArgs<scalar_t> args{
          reinterpret_cast<scalar_t*>(out.data_ptr()),
          reinterpret_cast<const scalar_t*>(x.data_ptr()),
          reinterpret_cast<const scalar_t*>(weight.data_ptr()),
          b.defined() ? reinterpret_cast<const scalar_t*>(b.data_ptr()) : nullptr,
          x.stride(0), m, k_dim, n, splits};
      launch_dense_gemv<scalar_t, GATED>(args, slabs, row_blocks, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void linear_small(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  run_dense_gemv<false>(out, x, weight, bias, "linear_small");
}

void gate_up_silu_small(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  run_dense_gemv<true>(out, x, weight, std::nullopt, "gate_up_silu_small");
}

}  // namespace splitvl::cuda
