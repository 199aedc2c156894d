// CPU kernel: the gated delta rule's per-head decay g and write strength beta from
// the b and a projections (ops/reference_linear_attn.py gdn_gating).
#include <ATen/Parallel.h>

#include <cmath>

#include "../linear_attn_checks.h"
#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

constexpr float kSoftplusThreshold = 20.f;  // torch's softplus default: linear above it

template <typename scalar_t>
void gdn_gating_impl(float* g, float* beta, const scalar_t* ba, int64_t ba_stride,
                     const float* a_log, const float* dt_bias, int64_t tokens, int64_t hv) {
  at::parallel_for(0, tokens, grain_for(hv, 4096), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const scalar_t* row = ba + t * ba_stride;
      for (int64_t h = 0; h < hv; ++h) {
        // beta: fp32 sigmoid rounded to ba's dtype, as torch's b.sigmoid() returns it.
        const float b = static_cast<float>(row[h]);
        beta[t * hv + h] = static_cast<float>(static_cast<scalar_t>(1.f / (1.f + std::exp(-b))));
        const float x = static_cast<float>(row[hv + h]) + dt_bias[h];
        const float softplus = x > kSoftplusThreshold ? x : std::log1p(std::exp(x));
        g[t * hv + h] = -std::exp(a_log[h]) * softplus;
      }
    }
  });
}

}  // namespace

void gdn_gating(at::Tensor& g, at::Tensor& beta, const at::Tensor& ba, const at::Tensor& A_log,
                const at::Tensor& dt_bias) {
  check_gdn_gating_args(g, beta, ba, A_log, dt_bias, "gdn_gating");
  SPLITVL_CHECK_CPU(ba);
  const int64_t tokens = ba.size(0), hv = A_log.numel();
  if (tokens == 0 || hv == 0) return;
  SPLITVL_DISPATCH_FLOATING(ba.scalar_type(), "gdn_gating", [&] {
    gdn_gating_impl<scalar_t>(g.data_ptr<float>(), beta.data_ptr<float>(),
                              ba.const_data_ptr<scalar_t>(), ba.stride(0),
                              A_log.const_data_ptr<float>(), dt_bias.const_data_ptr<float>(),
                              tokens, hv);
  });
}

}  // namespace splitvl::cpu
