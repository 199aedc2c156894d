// linear_small / gate_up_silu_small / add_rms_norm_linear_small: the checks shared by the
// CPU and CUDA kernels, and the ATen path (CPU always; CUDA for fp32 and for shapes the
// weight-streaming kernel does not take). Semantics: ops/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "check.h"

namespace splitvl {

// out [M, N] = x [M, K] w^T (+ bias [N]); gated: w [2N, K] is N gate rows then N up rows.
inline void check_linear_small(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, bool gated, const char* op) {
  const auto dtype = x.scalar_type();
  SPLITVL_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                ": x must be float32, float16 or bfloat16, got ", dtype);
  SPLITVL_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1), op,
                ": x [M, K] and weight [N, K] expected, got ", x.sizes(), " and ", weight.sizes());
  const int64_t n = gated ? weight.size(0) / 2 : weight.size(0);
  SPLITVL_CHECK(!gated || weight.size(0) % 2 == 0, op, ": weight must hold gate then up rows [2I, K], got ",
                weight.sizes());
  SPLITVL_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n && out.is_contiguous(), op,
                ": out must be contiguous [", x.size(0), ", ", n, "], got ", out.sizes());
  SPLITVL_CHECK(weight.scalar_type() == dtype && out.scalar_type() == dtype, op,
                ": x, weight and out must share a dtype, got ", dtype, ", ", weight.scalar_type(), ", ",
                out.scalar_type());
  SPLITVL_CHECK(weight.device() == x.device() && out.device() == x.device(), op,
                ": tensors on different devices (", x.device(), ", ", weight.device(), ", ", out.device(), ")");
  if (bias.has_value()) {
    SPLITVL_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == dtype &&
                      bias->device() == x.device(),
                  op, ": bias must be [", n, "] in x's dtype and device, got ", bias->sizes(), " ",
                  bias->scalar_type());
  }
}

// out [M, N] = linear_small(rms_norm(x + residual)), residual_out [M, K] = x + residual.
inline void check_add_rms_norm_linear_small(const at::Tensor& out, const at::Tensor& residual_out,
                                            const at::Tensor& x, const at::Tensor& residual,
                                            const at::Tensor& norm_weight, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const char* op) {
  check_linear_small(out, x, weight, bias, false, op);
  SPLITVL_CHECK(x.stride(1) == 1 || x.size(1) <= 1, op, ": x needs unit stride in the last dim, got strides ",
                x.strides());
  SPLITVL_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() &&
                    residual.device() == x.device() && (residual.stride(1) == 1 || residual.size(1) <= 1),
                op, ": residual must match x ", x.sizes(), " in shape, dtype and device, with unit last stride; got ",
                residual.sizes(), " ", residual.scalar_type());
  SPLITVL_CHECK(residual_out.sizes() == x.sizes() && residual_out.scalar_type() == x.scalar_type() &&
                    residual_out.device() == x.device() && residual_out.is_contiguous(),
                op, ": residual_out must be contiguous like x ", x.sizes(), ", got ", residual_out.sizes(), " ",
                residual_out.scalar_type());
  SPLITVL_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == x.size(1) && norm_weight.is_contiguous() &&
                    norm_weight.device() == x.device(),
                op, ": norm_weight must be contiguous [", x.size(1), "] on x's device, got ", norm_weight.sizes());
  SPLITVL_CHECK(norm_weight.scalar_type() == x.scalar_type() || norm_weight.scalar_type() == at::kFloat, op,
                ": norm_weight dtype ", norm_weight.scalar_type(), " must be float32 or x's dtype ",
                x.scalar_type());
}

// The same result through ATen matmuls (fp32 accumulation; the gate in fp32).
inline void linear_small_aten(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, bool gated) {
  if (out.numel() == 0) return;
  if (!gated) {
    if (bias.has_value()) at::addmm_out(out, *bias, x, weight.t());
    else at::mm_out(out, x, weight.t());
    return;
  }
  const at::Tensor y = at::mm(x, weight.t()).to(at::kFloat);
  const int64_t n = out.size(1);
  out.copy_(at::silu(y.narrow(1, 0, n)) * y.narrow(1, n, n));
}

}  // namespace splitvl
