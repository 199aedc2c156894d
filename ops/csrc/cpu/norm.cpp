// RMSNorm kernels: fp32 x * rsqrt(mean(x^2) + eps), then the weight (ops/reference.py
// rms_norm): a weight in the input dtype multiplies the normalized value rounded to
// that dtype (Qwen3); an fp32 weight with a bf16/fp16 input scales in fp32 and rounds
// once (Qwen3.5).
#include <cmath>
#include <type_traits>

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
  SPLITVL_CHECK(weight.scalar_type() == input.scalar_type() || weight.scalar_type() == at::kFloat,
              op, ": weight dtype ", weight.scalar_type(), " must be float32 or the input dtype ",
              input.scalar_type());
  SPLITVL_CHECK_CONTIG(weight);
}

template <typename T, typename W>
inline T scale_by_weight(float v, float inv, W w) {
  if constexpr (std::is_same_v<T, W>) {
    return static_cast<T>(static_cast<float>(static_cast<T>(v * inv)) * static_cast<float>(w));
  } else {
    return static_cast<T>(v * inv * static_cast<float>(w));
  }
}

// Calls f(W{}) with W the kernel's weight type: fp32, or the input's own type T.
template <typename T, typename F>
void with_weight_type(const at::Tensor& weight, F&& f) {
  if (weight.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    f(T{});
  }
}

template <typename T, typename W>
void rms_norm_impl(T* out, const T* in, const RowIndexer& rows, const W* w, int64_t d, float eps) {
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
      for (int64_t i = 0; i < d; ++i) o[i] = scale_by_weight<T, W>(static_cast<float>(x[i]), inv, w[i]);
    }
  });
}

template <typename T, typename W>
void fused_add_rms_norm_impl(T* x_base, const RowIndexer& x_rows, T* res_base,
                             const RowIndexer& res_rows, const W* w, int64_t d, float eps) {
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
      for (int64_t i = 0; i < d; ++i) x[i] = scale_by_weight<T, W>(static_cast<float>(res[i]), inv, w[i]);
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
    with_weight_type<scalar_t>(weight, [&](auto w_tag) {
      using W = decltype(w_tag);
      rms_norm_impl<scalar_t, W>(out.data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), rows,
                                 weight.const_data_ptr<W>(), input.size(-1),
                                 static_cast<float>(epsilon));
    });
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
    with_weight_type<scalar_t>(weight, [&](auto w_tag) {
      using W = decltype(w_tag);
      fused_add_rms_norm_impl<scalar_t, W>(input.data_ptr<scalar_t>(), x_rows,
                                           residual.data_ptr<scalar_t>(), res_rows,
                                           weight.const_data_ptr<W>(), input.size(-1),
                                           static_cast<float>(epsilon));
    });
  });
}

}  // namespace splitvl::cpu
