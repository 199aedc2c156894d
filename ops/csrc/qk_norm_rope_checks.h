// qk_norm_rope and qk_norm_rope_and_cache: the shape/dtype/device checks shared by the CPU
// and CUDA kernels (the rotary position checks are the rotary_embedding kernels' own).
// Semantics: ops/reference.py qk_norm_rope, qk_norm_rope_and_cache.
#pragma once

#include <ATen/ATen.h>

#include "check.h"

namespace splitvl {

inline void check_qk_norm_rope(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& q_weight, const at::Tensor& k_weight,
                               const at::Tensor& cos_sin_cache, const char* op = "qk_norm_rope") {
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

// qk_norm_rope's checks, then reshape_and_cache's on value, the caches and the slots: value
// [T, Hkv, D] like key (unit last stride), caches contiguous [num_blocks, block_size, Hkv, D]
// in the same dtype, slot_mapping int64 [T].
inline void check_qk_norm_rope_and_cache(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const at::Tensor& q_weight,
                                         const at::Tensor& k_weight, const at::Tensor& cos_sin_cache,
                                         const at::Tensor& key_cache, const at::Tensor& value_cache,
                                         const at::Tensor& slot_mapping) {
  constexpr const char* op = "qk_norm_rope_and_cache";
  check_qk_norm_rope(positions, query, key, q_weight, k_weight, cos_sin_cache, op);
  for (const at::Tensor* t : {&value, &key_cache, &value_cache, &slot_mapping})
    SPLITVL_CHECK(t->device() == query.device(), op, ": tensors on different devices (", query.device(),
                " vs ", t->device(), ")");
  SPLITVL_CHECK(value.sizes() == key.sizes() && value.scalar_type() == key.scalar_type(), op, ": value ",
              value.sizes(), " ", value.scalar_type(), " must match key ", key.sizes(), " ", key.scalar_type());
  SPLITVL_CHECK(value.stride(2) == 1 || value.size(2) <= 1, op, ": value needs unit stride in the last dim");
  SPLITVL_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() && key_cache.size(2) == key.size(1) &&
                  key_cache.size(3) == key.size(2),
              op, ": key_cache ", key_cache.sizes(), " and value_cache ", value_cache.sizes(),
              " must both be [num_blocks, block_size, ", key.size(1), ", ", key.size(2), "]");
  SPLITVL_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), op, ": caches must be contiguous");
  SPLITVL_CHECK(key_cache.scalar_type() == key.scalar_type() && value_cache.scalar_type() == key.scalar_type(), op,
              ": key_cache / value_cache dtypes ", key_cache.scalar_type(), " / ", value_cache.scalar_type(),
              " differ from key's ", key.scalar_type());
  SPLITVL_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong,
              op, ": slot_mapping must be int64 [T] with T = ", key.size(0), ", got ", slot_mapping.sizes(), " ",
              slot_mapping.scalar_type());
}

}  // namespace splitvl
