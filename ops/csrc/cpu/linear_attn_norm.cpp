// CPU kernel: gated RMSNorm of the Qwen3.5 linear-attention output,
// RMSNorm(x) * weight * silu(z), with transformers' Qwen3_5RMSNormGated casts.
// Semantics: ops/reference_linear_attn.py (gated_rms_norm).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>

#include "../linear_attn_checks.h"
#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

template <typename scalar_t, typename weight_t>
void gated_rms_norm_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& z,
                         const at::Tensor& weight, float eps, GatedNormZ zl) {
  const int64_t rows = x.size(0), d = x.size(1);
  const int64_t x_stride = x.stride(0);
  const scalar_t *x_p = x.data_ptr<scalar_t>(), *z_p = z.data_ptr<scalar_t>();
  const weight_t* w_p = weight.data_ptr<weight_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* xr = x_p + r * x_stride;
      const scalar_t* zr = z_p + (r / zl.heads) * zl.group_stride + (r % zl.heads) * zl.head_stride;
      float sq = 0.f;
      for (int64_t i = 0; i < d; ++i) {
        const float v = static_cast<float>(xr[i]);
        sq += v * v;
      }
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(d) + eps);
      for (int64_t i = 0; i < d; ++i) {
        // Normalized value rounded to x's dtype, times the weight in the promoted
        // dtype (rounded again when the weight is half precision too).
        float h = static_cast<float>(static_cast<scalar_t>(static_cast<float>(xr[i]) * inv));
        h *= static_cast<float>(w_p[i]);
        if constexpr (!std::is_same_v<weight_t, float>) h = static_cast<float>(static_cast<weight_t>(h));
        const float zf = static_cast<float>(zr[i]);
        out_p[r * d + i] = static_cast<scalar_t>(h * (zf / (1.f + std::exp(-zf))));
      }
    }
  });
}

}  // namespace

void gated_rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& z,
                    const at::Tensor& weight, double eps) {
  const GatedNormZ zl = check_gated_rms_norm_args(out, x, z, weight, "gated_rms_norm");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_rms_norm", [&] {
    if (weight.scalar_type() == at::kFloat) {
      gated_rms_norm_impl<scalar_t, float>(out, x, z, weight, static_cast<float>(eps), zl);
    } else {
      gated_rms_norm_impl<scalar_t, scalar_t>(out, x, z, weight, static_cast<float>(eps), zl);
    }
  });
}

}  // namespace splitvl::cpu
