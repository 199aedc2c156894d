// qk_norm_rope: the shape/dtype/device checks shared by the CPU and CUDA kernels
// (the rotary position checks are the rotary_embedding kernels' own).
// Semantics: ops/reference.py qk_norm_rope.
#pragma once

#include <ATen/ATen.h>

#include "check.h"

namespace splitvl {

inline void check_qk_norm_rope(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& q_weight, const at::Tensor& k_weight,
                               const at::Tensor& cos_sin_cache) {
  constexpr const char* op = "qk_norm_rope";
  for (const at::Tensor* t : {&positions, &key, &q_weight, &k_weight, &cos_sin_cache})
    SPLITVL_CHECK(t->device() == query.device(), op, ": tensors on different devices (", query.device(),
                " vs ", t->device(), ")");
  const auto dtype = query.scalar_type();
  SPLITVL_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": query must be float32, float16 or bfloat16, got ", dtype);
  SPLITVL_CHECK(key.scalar_type() == dtype, op, ": key dtype ", key.scalar_type(), " differs from query's ", dtype);
  SPLITVL_CHECK(query.dim() == 3 && key.dim() == 3 && key.size(0) == query.size(0) &&
                  key.size(2) == query.size(2),
              op, ": query ", query.sizes(), " and key ", key.sizes(), " must be [T, H, D] with the same T and D");
  SPLITVL_CHECK(positions.dim() >= 1 && positions.size(-1) == query.size(0), op, ": query has ", query.size(0),
              " tokens, positions ", positions.sizes());
  SPLITVL_CHECK((query.stride(2) == 1 || query.size(2) <= 1) && (key.stride(2) == 1 || key.size(2) <= 1), op,
              ": query and key need unit stride in the last dim");
  const int64_t D = query.size(2);
  SPLITVL_CHECK(q_weight.scalar_type() == k_weight.scalar_type(), op, ": q_weight ", q_weight.scalar_type(),
              " and k_weight ", k_weight.scalar_type(), " dtypes differ");
  for (const at::Tensor* w : {&q_weight, &k_weight}) {
    SPLITVL_CHECK(w->dim() == 1 && w->size(0) == D && w->is_contiguous(), op, ": weights must be contiguous [D=",
                D, "], got ", w->sizes());
    SPLITVL_CHECK(w->scalar_type() == dtype || w->scalar_type() == at::kFloat, op, ": weight dtype ",
                w->scalar_type(), " must be float32 or the input dtype ", dtype);
  }
  SPLITVL_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.scalar_type() == at::kFloat &&
                  cos_sin_cache.is_contiguous(),
              op, ": cos_sin_cache must be contiguous float32 [max_pos, rot_dim]");
  const int64_t rot_dim = cos_sin_cache.size(1);
  SPLITVL_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= D, op, ": rot_dim ", rot_dim,
              " must be even, positive and <= head dim ", D);
}

}  // namespace splitvl
