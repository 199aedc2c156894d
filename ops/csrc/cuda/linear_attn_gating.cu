// CUDA kernel: the gated delta rule's per-head decay g and write strength beta from
// the b and a projections (ops/reference_linear_attn.py gdn_gating). One thread per
// (token, head): a decode step's handful of values in one launch instead of six.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "../linear_attn_checks.h"
#include "common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kSoftplusThreshold = 20.f;  // torch's softplus default: linear above it

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gdn_gating_kernel(float* __restrict__ g, float* __restrict__ beta, const T* __restrict__ ba,
                      int64_t ba_stride, const float* __restrict__ a_log,
                      const float* __restrict__ dt_bias, int64_t total, int hv) {
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    const int64_t t = i / hv;
    const int h = static_cast<int>(i - t * hv);
    const T* row = ba + t * ba_stride;
    // beta: fp32 sigmoid rounded to ba's dtype, as torch's b.sigmoid() returns it.
    beta[i] = to_float(from_float<T>(1.f / (1.f + expf(-to_float(row[h])))));
    const float x = to_float(row[hv + h]) + dt_bias[h];
    const float softplus = x > kSoftplusThreshold ? x : log1pf(expf(x));
    g[i] = -expf(a_log[h]) * softplus;
  }
}

}  // namespace

void gdn_gating(at::Tensor& g, at::Tensor& beta, const at::Tensor& ba, const at::Tensor& A_log,
                const at::Tensor& dt_bias) {
  constexpr const char* op = "gdn_gating";
  check_gdn_gating_args(g, beta, ba, A_log, dt_bias, op);
  check_cuda(ba, op, "ba");
  const int64_t hv = A_log.numel(), total = ba.size(0) * hv;
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(ba.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
  SPLITVL_DISPATCH_FLOAT(ba.scalar_type(), op, [&] {
    gdn_gating_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        g.data_ptr<float>(), beta.data_ptr<float>(), reinterpret_cast<const scalar_t*>(ba.data_ptr()),
        ba.stride(0), A_log.data_ptr<float>(), dt_bias.data_ptr<float>(), total, static_cast<int>(hv));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
