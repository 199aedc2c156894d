// RMSNorm kernels (Qwen3 semantics): fp32 x * rsqrt(mean(x^2) + eps), rounded to
// the input dtype, then multiplied by the weight.
#include <cmath>

#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

void check_norm_args(const at::Tensor& input, const at::Tensor& weight, const char* op) {
  SPLITVL_CHECK_CPU(input);
  SPLITVL_CHECK_CPU(weight);
  SPLITVL_CHECK_FLOAT_DTYPE(input);
  SPLITVL_CHECK_LAST_CONTIG(input);
  SPLITVL_CHECK(weight.dim() == 1 && weight.size(0) == input.size(-1), op, ": weight ",
              weight.sizes(), " must be [D] with D = input.size(-1) (input ", input.sizes(), ")");
  SPLITVL_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " != input dtype ", input.scalar_type());
  SPLITVL_CHECK_CONTIG(weight);
}

template <typename T>
void rms_norm_impl(T* out, const T* in, const RowIndexer& rows, const T* w, int64_t d, float eps) {
  at::parallel_for(0, rows.rows(), grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = in + rows.offset(r);
      float sum_sq = 0.f;
      for (int64_t i = 0; i < d; ++i) {
        const float v = static_cast<float>(x[i]);
        sum_sq += v * v;
      }
      const float inv = 1.f / std::sqrt(sum_sq / static_cast<float>(d) + eps);
      T* o = out + r * d;
      for (int64_t i = 0; i < d; ++i) {
        const T normed = static_cast<T>(static_cast<float>(x[i]) * inv);
        o[i] = static_cast<T>(static_cast<float>(normed) * static_cast<float>(w[i]));
      }
    }
  });
}

template <typename T>
void fused_add_rms_norm_impl(T* x_base, const RowIndexer& x_rows, T* res_base,
                             const RowIndexer& res_rows, const T* w, int64_t d, float eps) {
  at::parallel_for(0, x_rows.rows(), grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* x = x_base + x_rows.offset(r);
      T* res = res_base + res_rows.offset(r);
      float sum_sq = 0.f;
      for (int64_t i = 0; i < d; ++i) {
        const T sum = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(res[i]));
        res[i] = sum;
        const float v = static_cast<float>(sum);
        sum_sq += v * v;
      }
      const float inv = 1.f / std::sqrt(sum_sq / static_cast<float>(d) + eps);
      for (int64_t i = 0; i < d; ++i) {
        const T normed = static_cast<T>(static_cast<float>(res[i]) * inv);
        x[i] = static_cast<T>(static_cast<float>(normed) * static_cast<float>(w[i]));
      }
    }
  });
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  check_norm_args(input, weight, "rms_norm");
  SPLITVL_CHECK_CPU(out);
  SPLITVL_CHECK_CONTIG(out);
  SPLITVL_CHECK(out.sizes() == input.sizes() && out.scalar_type() == input.scalar_type(),
              "rms_norm: out ", out.sizes(), " ", out.scalar_type(), " must match input ",
              input.sizes(), " ", input.scalar_type());
  if (input.numel() == 0) return;
  const RowIndexer rows(input);
  SPLITVL_DISPATCH_FLOATING(input.scalar_type(), "splitvl_rms_norm", [&] {
    rms_norm_impl<scalar_t>(out.data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), rows,
                            weight.const_data_ptr<scalar_t>(), input.size(-1),
                            static_cast<float>(epsilon));
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon) {
  check_norm_args(input, weight, "fused_add_rms_norm");
  SPLITVL_CHECK_CPU(residual);
  SPLITVL_CHECK_LAST_CONTIG(residual);
  SPLITVL_CHECK(residual.sizes() == input.sizes() && residual.scalar_type() == input.scalar_type(),
              "fused_add_rms_norm: residual ", residual.sizes(), " ", residual.scalar_type(),
              " must match input ", input.sizes(), " ", input.scalar_type());
  if (input.numel() == 0) return;
  const RowIndexer x_rows(input), res_rows(residual);
  SPLITVL_DISPATCH_FLOATING(input.scalar_type(), "splitvl_fused_add_rms_norm", [&] {
    fused_add_rms_norm_impl<scalar_t>(input.data_ptr<scalar_t>(), x_rows,
                                      residual.data_ptr<scalar_t>(), res_rows,
                                      weight.const_data_ptr<scalar_t>(), input.size(-1),
                                      static_cast<float>(epsilon));
  });
}

}  // namespace splitvl::cpu
