// The fused MoE decode ops on the CPU (semantics: ops/reference_moe.py): the router linear
// with moe_route (moe_gate_route), and moe_combine with fused_add_rms_norm
// (moe_combine_add_rms_norm). Each runs the CPU kernels of the ops it fuses, so the results
// are theirs bit for bit (the router's logits are fp32, as the reference keeps them).
#include <ATen/ops/linear.h>

#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {

void moe_gate_route(at::Tensor& topk_weights, at::Tensor& topk_ids, at::Tensor& sorted_pairs,
                    at::Tensor& pair_pos, at::Tensor& block_experts, at::Tensor& total_padded,
                    at::Tensor& logits, at::Tensor& arrivals, const at::Tensor& x,
                    const at::Tensor& gate_weight, bool renormalize) {
  SPLITVL_CHECK_CPU(x);
  SPLITVL_CHECK_CPU(gate_weight);
  SPLITVL_CHECK_CPU(logits);
  SPLITVL_CHECK_CPU(arrivals);
  SPLITVL_CHECK_FLOAT_DTYPE(x);
  SPLITVL_CHECK_DTYPE(logits, at::kFloat);
  SPLITVL_CHECK_CONTIG(logits);
  SPLITVL_CHECK(arrivals.numel() == 1 && arrivals.scalar_type() == at::kInt,
                "moe_gate_route: arrivals must be one int32");
  SPLITVL_CHECK(x.dim() == 2 && gate_weight.dim() == 2 && gate_weight.size(1) == x.size(1) &&
                    gate_weight.scalar_type() == x.scalar_type(),
                "moe_gate_route: x [T, H] and gate_weight [E, H] of one dtype expected, got ",
                x.sizes(), " and ", gate_weight.sizes());
  SPLITVL_CHECK(logits.sizes() == at::IntArrayRef({x.size(0), gate_weight.size(0)}),
                "moe_gate_route: logits must be [T, E], got ", logits.sizes());
  logits.copy_(at::linear(x.to(at::kFloat), gate_weight.to(at::kFloat)));
  moe_route(topk_weights, topk_ids, sorted_pairs, pair_pos, block_experts, total_padded, logits,
            renormalize);
}

void moe_combine_add_rms_norm(at::Tensor& out, at::Tensor& residual, const at::Tensor& y,
                              const at::Tensor& pair_pos,
                              const std::optional<at::Tensor>& topk_weights,
                              const at::Tensor& weight, double epsilon) {
  SPLITVL_CHECK(out.scalar_type() == y.scalar_type(),
                "moe_combine_add_rms_norm: out must have y's dtype ", y.scalar_type());
  moe_combine(out, y, pair_pos, topk_weights);
  fused_add_rms_norm(out, residual, weight, epsilon);
}

}  // namespace splitvl::cpu
