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
#include "../linear_small.h"
#include "dense_gemv.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

using namespace gemv;

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

template <typename T, bool GATED>
void launch_dense_gemv(const DenseArgs<T>& args, int64_t slabs, int64_t row_blocks,
                       cudaStream_t stream) {
  const dim3 grid(args.splits, static_cast<unsigned>(slabs), static_cast<unsigned>(row_blocks));
  launch_pdl_cluster(static_cast<unsigned>(args.splits), dense_gemv_kernel<T, GATED>, grid, kWarps * 32, 0,
                     stream, args);
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
