// moe_decode_block (semantics: ops/reference_moe.py): the checks both backends share, and the
// chain of ops it replaces (fused_add_rms_norm -> router linear -> moe_route -> moe_gate_up ->
// moe_down -> moe_combine), which the CPU kernel runs and the CUDA op falls back to.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ops/linear.h>

#include <optional>

#include "check.h"

namespace splitvl {

struct MoeDecodeDims {
  int64_t tokens, hidden, experts, inter, k;
};

// The checks of moe_decode_block's arguments (before any backend's own); returns its sizes.
inline MoeDecodeDims check_moe_decode_block(const at::Tensor& out, const at::Tensor& residual,
                                            const at::Tensor& barrier, const at::Tensor& x,
                                            const at::Tensor& norm_weight,
                                            const at::Tensor& gate_weight,
                                            const at::Tensor& gate_up_proj,
                                            const at::Tensor& down_proj, int64_t top_k) {
  constexpr const char* op = "moe_decode_block";
  for (const at::Tensor* t : {&out, &residual, &barrier, &norm_weight, &gate_weight,
                              &gate_up_proj, &down_proj})
    SPLITVL_CHECK(t->device() == x.device(), op, ": tensors on different devices (", x.device(),
                  " vs ", t->device(), ")");
  const auto dtype = x.scalar_type();
  SPLITVL_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                ": x must be float32, float16 or bfloat16, got ", dtype);
  SPLITVL_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && residual.scalar_type() == dtype,
                op, ": x and residual must be [T, H] of one dtype, got ", x.sizes(), " and ",
                residual.sizes());
  SPLITVL_CHECK(x.stride(1) == 1 && residual.stride(1) == 1, op,
                ": x and residual need unit stride over H");
  SPLITVL_CHECK(out.sizes() == x.sizes() && out.scalar_type() == dtype && out.is_contiguous(), op,
                ": out must be contiguous [T, H] in x's dtype");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  SPLITVL_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == hidden &&
                    (norm_weight.scalar_type() == dtype || norm_weight.scalar_type() == at::kFloat),
                op, ": norm_weight must be [H] in x's dtype or float32, got ", norm_weight.sizes());
  SPLITVL_CHECK(gate_weight.dim() == 2 && gate_weight.size(1) == hidden &&
                    gate_weight.scalar_type() == dtype,
                op, ": gate_weight must be [E, H] in x's dtype, got ", gate_weight.sizes());
  const int64_t experts = gate_weight.size(0);
  SPLITVL_CHECK(gate_up_proj.dim() == 3 && gate_up_proj.size(0) == experts &&
                    gate_up_proj.size(1) % 2 == 0 && gate_up_proj.size(2) == hidden &&
                    gate_up_proj.scalar_type() == dtype,
                op, ": gate_up_proj must be [E, 2I, H] in x's dtype, got ", gate_up_proj.sizes());
  const int64_t inter = gate_up_proj.size(1) / 2;
  SPLITVL_CHECK(down_proj.dim() == 3 && down_proj.size(0) == experts &&
                    down_proj.size(1) == hidden && down_proj.size(2) == inter &&
                    down_proj.scalar_type() == dtype,
                op, ": down_proj must be [E, H, I] in x's dtype, got ", down_proj.sizes());
  SPLITVL_CHECK(experts >= 1 && experts <= 1024, op, ": 1..1024 experts, got ", experts);
  SPLITVL_CHECK(top_k >= 1 && top_k <= 32 && top_k <= experts, op, ": topk ", top_k,
                " must be in [1, min(32, E=", experts, ")]");
  SPLITVL_CHECK(barrier.scalar_type() == at::kInt && barrier.numel() == 1, op,
                ": barrier must be one int32");
  return {tokens, hidden, experts, inter, top_k};
}

// ops/reference_moe.py align_block_size and align_capacity.
inline int64_t moe_align_block_size(int64_t pairs, int64_t experts) {
  const double per_expert = double(pairs) / double(std::max<int64_t>(1, experts));
  if (per_expert <= 16) return 16;
  return per_expert < 64 ? 64 : 128;
}

inline int64_t moe_align_capacity(int64_t pairs, int64_t experts, int64_t block) {
  const int64_t hit = std::min(pairs, experts);
  return (pairs + hit * (block - 1)) / block * block;
}

// The chain moe_decode_block replaces, on one backend's kernels (Ops: static members
// fused_add_rms_norm, moe_route, moe_gate_up, moe_down, moe_combine of that backend), with the
// router linear as ReplicatedLinear runs it (at::linear in x's dtype). Bit for bit the ops'
// results; x itself is left alone (the norm runs on a copy).
template <typename Ops>
void moe_decode_block_chain(at::Tensor& out, at::Tensor& residual, const at::Tensor& x,
                            const at::Tensor& norm_weight, double epsilon,
                            const at::Tensor& gate_weight, const at::Tensor& gate_up_proj,
                            const at::Tensor& down_proj, const MoeDecodeDims& d,
                            bool renormalize) {
  if (d.tokens == 0) return;
  at::Tensor normed = x.contiguous().clone();
  Ops::fused_add_rms_norm(normed, residual, norm_weight, epsilon);
  const at::Tensor logits = at::linear(normed, gate_weight);
  const int64_t pairs = d.tokens * d.k;
  const int64_t block = moe_align_block_size(pairs, d.experts);
  const int64_t capacity = moe_align_capacity(pairs, d.experts, block);
  const auto ints = x.options().dtype(at::kInt);
  at::Tensor weights = at::empty({d.tokens, d.k}, x.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({d.tokens, d.k}, ints);
  at::Tensor sorted = at::empty({capacity}, ints);
  at::Tensor pos = at::empty({d.tokens, d.k}, ints);
  at::Tensor block_experts = at::empty({capacity / block}, ints);
  at::Tensor total = at::empty({1}, ints);
  Ops::moe_route(weights, ids, sorted, pos, block_experts, total, logits, renormalize);
  at::Tensor h = at::empty({capacity, d.inter}, x.options());
  Ops::moe_gate_up(h, normed, gate_up_proj, sorted, block_experts, total, d.k);
  at::Tensor y = at::empty({capacity, d.hidden}, x.options());
  Ops::moe_down(y, h, down_proj, weights, sorted, block_experts, total);
  Ops::moe_combine(out, y, pos, std::nullopt);
}

}  // namespace splitvl
