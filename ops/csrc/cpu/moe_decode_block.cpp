// moe_decode_block on the CPU (semantics: ops/reference_moe.py): the chain of CPU kernels it
// replaces (moe_decode_block.h), so its results are theirs bit for bit.
#include "../moe_decode_block.h"

#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

struct CpuChain {
  static constexpr auto fused_add_rms_norm = &cpu::fused_add_rms_norm;
  static constexpr auto moe_route = &cpu::moe_route;
  static constexpr auto moe_gate_up = &cpu::moe_gate_up;
  static constexpr auto moe_down = &cpu::moe_down;
  static constexpr auto moe_combine = &cpu::moe_combine;
};

}  // namespace

void moe_decode_block(at::Tensor& out, at::Tensor& residual, at::Tensor& barrier,
                      const at::Tensor& x, const at::Tensor& norm_weight, double epsilon,
                      const at::Tensor& gate_weight, const at::Tensor& gate_up_proj,
                      const at::Tensor& down_proj, int64_t top_k, bool renormalize) {
  SPLITVL_CHECK_CPU(x);
  const MoeDecodeDims d = check_moe_decode_block(out, residual, barrier, x, norm_weight,
                                                 gate_weight, gate_up_proj, down_proj, top_k);
  moe_decode_block_chain<CpuChain>(out, residual, x, norm_weight, epsilon, gate_weight,
                                   gate_up_proj, down_proj, d, renormalize);
}

}  // namespace splitvl::cpu
