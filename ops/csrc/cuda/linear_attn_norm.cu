// CUDA kernel: gated RMSNorm of the Qwen3.5 linear-attention output,
// RMSNorm(x) * weight * silu(z), with transformers' Qwen3_5RMSNormGated casts.
// Semantics: ops/reference_linear_attn.py (gated_rms_norm).
#include <c10/cuda/CUDAException.h>

#include <type_traits>

#include "../linear_attn_checks.h"
#include "common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 128;

// One CTA per row.
template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kThreads)
    gated_rms_norm_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                          const scalar_t* __restrict__ z, const weight_t* __restrict__ weight,
                          int64_t d, int64_t x_stride, int64_t z_stride, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * x_stride;
  const scalar_t* zr = z + row * z_stride;
  float sq = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const float v = to_float(xr[i]);
    sq += v * v;
  }
  const float inv = rsqrtf(block_sum(sq, scratch) / static_cast<float>(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    float h = to_float(from_float<scalar_t>(to_float(xr[i]) * inv)) * to_float(weight[i]);
    if constexpr (!std::is_same_v<weight_t, float>) h = to_float(from_float<weight_t>(h));
    const float zf = to_float(zr[i]);
    out[row * d + i] = from_float<scalar_t>(h * (zf / (1.f + expf(-zf))));
  }
}

}  // namespace

void gated_rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& z,
                    const at::Tensor& weight, double eps) {
  const char* op = "gated_rms_norm";
  check_gated_rms_norm_args(out, x, z, weight, op);
  check_cuda(x, op, "x");
  const int64_t rows = x.size(0), d = x.size(1);
  if (rows == 0 || d == 0) return;
  SPLITVL_CHECK(rows <= 0x7fffffff, op, ": too many rows");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    auto* out_p = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x_p = reinterpret_cast<const scalar_t*>(x.data_ptr());
    const auto* z_p = reinterpret_cast<const scalar_t*>(z.data_ptr());
    if (weight.scalar_type() == at::kFloat) {
      gated_rms_norm_kernel<scalar_t, float><<<rows, kThreads, 0, stream>>>(
          out_p, x_p, z_p, weight.data_ptr<float>(), d, x.stride(0), z.stride(0),
          static_cast<float>(eps));
    } else {
      gated_rms_norm_kernel<scalar_t, scalar_t><<<rows, kThreads, 0, stream>>>(
          out_p, x_p, z_p, reinterpret_cast<const scalar_t*>(weight.data_ptr()), d, x.stride(0),
          z.stride(0), static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace splitvl::cuda
