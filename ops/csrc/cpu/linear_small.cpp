// Small-row linears on the CPU: ATen matmuls (the CUDA op's weight-streaming kernel
// has no CPU counterpart worth having; CI's tiny models run these), after the norm for
// add_rms_norm_linear_small.
#include "../linear_small.h"
#include "ops_cpu.h"

namespace splitvl::cpu {

void linear_small(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  SPLITVL_CHECK(x.device().is_cpu(), "linear_small: x must be a CPU tensor, got ", x.device());
  check_linear_small(out, x, weight, bias, false, "linear_small");
  linear_small_aten(out, x, weight, bias, false);
}

void gate_up_silu_small(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  SPLITVL_CHECK(x.device().is_cpu(), "gate_up_silu_small: x must be a CPU tensor, got ", x.device());
  check_linear_small(out, x, weight, std::nullopt, true, "gate_up_silu_small");
  linear_small_aten(out, x, weight, std::nullopt, true);
}

// The composed ops on a copy of x: the same rounding as calling them in turn.
void add_rms_norm_linear_small(at::Tensor& out, at::Tensor& residual_out, const at::Tensor& x,
                               const at::Tensor& residual, const at::Tensor& norm_weight, double epsilon,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "add_rms_norm_linear_small";
  SPLITVL_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  check_add_rms_norm_linear_small(out, residual_out, x, residual, norm_weight, weight, bias, op);
  residual_out.copy_(residual);
  at::Tensor normed = x.clone(at::MemoryFormat::Contiguous);
  fused_add_rms_norm(normed, residual_out, norm_weight, epsilon);
  linear_small_aten(out, normed, weight, bias, false);
}

}  // namespace splitvl::cpu
