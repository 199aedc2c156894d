// Small-row linears on the CPU: ATen matmuls (the CUDA op's weight-streaming kernel
// has no CPU counterpart worth having; CI's tiny models run these).
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

}  // namespace splitvl::cpu
