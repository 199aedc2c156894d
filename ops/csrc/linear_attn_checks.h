// Qwen3.5 linear-attention ops: the shape/dtype/device checks shared by the CPU
// and CUDA kernels (value checks that read tensor data are CPU-only:
// cpu/cpu_common.h). Semantics: ops/reference_linear_attn.py.
#pragma once

#include <ATen/ATen.h>

#include "check.h"

#include <optional>

namespace splitvl {

inline void la_check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                                  const char* name) {
  SPLITVL_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(), ", expected ",
              a.device());
}

inline void la_check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto d = t.scalar_type();
  SPLITVL_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", d);
}

inline void la_check_index(const at::Tensor& t, int64_t size, at::ScalarType dtype, const char* op,
                           const char* name) {
  SPLITVL_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape [", size,
              "], got ", t.sizes());
  SPLITVL_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  SPLITVL_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// state_indices [B] int32, and cu_seqlens [B+1] int32 (packed prefill) or, when null,
// one of the `tokens` rows per sequence (decode); has_initial_state [B] bool when given.
// All on `ref`'s device. Returns B.
inline int64_t la_check_sequences(const at::Tensor& ref, int64_t tokens,
                                  const at::Tensor* cu_seqlens, const at::Tensor& state_indices,
                                  const std::optional<at::Tensor>& has_initial_state,
                                  const char* op) {
  const int64_t batch = state_indices.numel();
  la_check_index(state_indices, batch, at::kInt, op, "state_indices");
  la_check_same_device(ref, state_indices, op, "state_indices");
  if (cu_seqlens != nullptr) {
    la_check_index(*cu_seqlens, batch + 1, at::kInt, op, "cu_seqlens");
    la_check_same_device(ref, *cu_seqlens, op, "cu_seqlens");
  } else {
    SPLITVL_CHECK(tokens == batch, op, ": ", tokens, " tokens for ", batch,
                " sequences (decode takes one token per sequence)");
  }
  if (has_initial_state.has_value()) {
    la_check_index(*has_initial_state, batch, at::kBool, op, "has_initial_state");
    la_check_same_device(ref, *has_initial_state, op, "has_initial_state");
  }
  return batch;
}

// causal_conv1d_fwd / causal_conv1d_update. `cu_seqlens` is null for the
// update (one token per sequence). Returns the number of sequences.
inline int64_t check_conv1d_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const at::Tensor& conv_states, const at::Tensor* cu_seqlens,
                                 const at::Tensor& state_indices,
                                 const std::optional<at::Tensor>& has_initial_state,
                                 const char* op) {
  SPLITVL_CHECK(x.dim() == 2 && x.stride(1) == 1, op,
              ": x must be [tokens, dim] with unit stride along dim, got sizes ", x.sizes(),
              " strides ", x.strides());
  la_check_float_dtype(x, op, "x");
  const int64_t dim = x.size(1);
  SPLITVL_CHECK(weight.dim() == 2 && weight.size(0) == dim && weight.size(1) >= 1 &&
                  weight.is_contiguous(),
              op, ": weight must be contiguous [dim=", dim, ", width], got ", weight.sizes());
  const int64_t width = weight.size(1);
  SPLITVL_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " != x dtype ", x.scalar_type());
  if (bias.has_value()) {
    SPLITVL_CHECK(bias->dim() == 1 && bias->size(0) == dim && bias->is_contiguous(), op,
                ": bias must be contiguous [", dim, "], got ", bias->sizes());
    SPLITVL_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype must match x");
    la_check_same_device(x, *bias, op, "bias");
  }
  SPLITVL_CHECK(conv_states.dim() == 3 && conv_states.size(1) == dim &&
                  conv_states.size(2) == width - 1 && conv_states.is_contiguous(),
              op, ": conv_states must be contiguous [num_slots, ", dim, ", ", width - 1, "], got ",
              conv_states.sizes());
  SPLITVL_CHECK(conv_states.scalar_type() == x.scalar_type(), op, ": conv_states dtype ",
              conv_states.scalar_type(), " != x dtype ", x.scalar_type());
  SPLITVL_CHECK(out.sizes() == x.sizes() && out.is_contiguous() &&
                  out.scalar_type() == x.scalar_type(),
              op, ": out must be contiguous ", x.sizes(), " of x's dtype");
  const int64_t batch =
      la_check_sequences(x, x.size(0), cu_seqlens, state_indices, has_initial_state, op);
  for (const at::Tensor* t : {&out, &weight, &conv_states}) {
    la_check_same_device(x, *t, op, "a tensor argument");
  }
  return batch;
}

// gated_delta_rule_chunked / gated_delta_rule_recurrent. Returns the number of sequences.
inline int64_t check_delta_rule_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& g,
                                     const at::Tensor& beta, const at::Tensor* cu_seqlens,
                                     const at::Tensor& states, const at::Tensor& state_indices,
                                     const std::optional<at::Tensor>& has_initial_state,
                                     const char* op) {
  SPLITVL_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op,
              ": q, k, v must be [tokens, heads, head_dim]");
  SPLITVL_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, op,
              ": q, k, v need unit stride along head_dim");
  la_check_float_dtype(q, op, "q");
  SPLITVL_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype");
  const int64_t tokens = q.size(0), hk = q.size(1), dk = q.size(2);
  const int64_t hv = v.size(1), dv = v.size(2);
  SPLITVL_CHECK(k.sizes() == q.sizes(), op, ": k ", k.sizes(), " must match q ", q.sizes());
  SPLITVL_CHECK(v.size(0) == tokens, op, ": v has ", v.size(0), " tokens, q has ", tokens);
  SPLITVL_CHECK(hk > 0 && hv % hk == 0, op, ": value heads (", hv,
              ") must be a multiple of key heads (", hk, ")");
  for (const at::Tensor* t : {&g, &beta}) {
    SPLITVL_CHECK(t->dim() == 2 && t->size(0) == tokens && t->size(1) == hv && t->is_contiguous() &&
                    t->scalar_type() == at::kFloat,
                op, ": g and beta must be contiguous float32 [", tokens, ", ", hv, "], got ",
                t->sizes(), " ", t->scalar_type());
  }
  SPLITVL_CHECK(states.dim() == 4 && states.size(1) == hv && states.size(2) == dk &&
                  states.size(3) == dv && states.is_contiguous() &&
                  states.scalar_type() == at::kFloat,
              op, ": states must be contiguous float32 [num_slots, ", hv, ", ", dk, ", ", dv,
              "], got ", states.sizes(), " ", states.scalar_type());
  SPLITVL_CHECK(out.dim() == 3 && out.size(0) == tokens && out.size(1) == hv && out.size(2) == dv &&
                  out.is_contiguous() && out.scalar_type() == q.scalar_type(),
              op, ": out must be contiguous [", tokens, ", ", hv, ", ", dv, "] of q's dtype");
  const int64_t batch =
      la_check_sequences(q, tokens, cu_seqlens, state_indices, has_initial_state, op);
  for (const at::Tensor* t : {&out, &k, &v, &g, &beta, &states}) {
    la_check_same_device(q, *t, op, "a tensor argument");
  }
  return batch;
}

// What an op's kernel knows once its arguments passed the checks: the op's name (for the
// kernel's own messages) and the number of sequences.
struct LinearAttnCall {
  const char* op;
  int64_t batch;
};

// One check per op, called by its CPU and CUDA kernels alike.
inline LinearAttnCall check_causal_conv1d_fwd(const at::Tensor& out, const at::Tensor& x,
                                              const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const at::Tensor& conv_states,
                                              const at::Tensor& cu_seqlens,
                                              const at::Tensor& state_indices,
                                              const std::optional<at::Tensor>& has_initial_state) {
  constexpr const char* op = "causal_conv1d_fwd";
  return {op, check_conv1d_args(out, x, weight, bias, conv_states, &cu_seqlens, state_indices,
                                has_initial_state, op)};
}

inline LinearAttnCall check_causal_conv1d_update(const at::Tensor& out, const at::Tensor& x,
                                                 const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const at::Tensor& conv_states,
                                                 const at::Tensor& state_indices) {
  constexpr const char* op = "causal_conv1d_update";
  return {op, check_conv1d_args(out, x, weight, bias, conv_states, nullptr, state_indices,
                                std::nullopt, op)};
}

inline LinearAttnCall check_gated_delta_rule_chunked(
    const at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& g, const at::Tensor& beta, const at::Tensor& cu_seqlens,
    const at::Tensor& states, const at::Tensor& state_indices,
    const std::optional<at::Tensor>& has_initial_state) {
  constexpr const char* op = "gated_delta_rule_chunked";
  return {op, check_delta_rule_args(out, q, k, v, g, beta, &cu_seqlens, states, state_indices,
                                    has_initial_state, op)};
}

inline LinearAttnCall check_gated_delta_rule_recurrent(const at::Tensor& out, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& g, const at::Tensor& beta,
                                                       const at::Tensor& states,
                                                       const at::Tensor& state_indices) {
  constexpr const char* op = "gated_delta_rule_recurrent";
  return {op, check_delta_rule_args(out, q, k, v, g, beta, nullptr, states, state_indices,
                                    std::nullopt, op)};
}

// Where gated_rms_norm's z row r starts: (r / heads) * group_stride + (r % heads) * head_stride.
struct GatedNormZ {
  int64_t heads, group_stride, head_stride;
};

// x [N, D]; z [N, D], or [N / H, H, D] with two outer strides (the model's head view of a wider
// projection's columns, which no single row stride describes); both unit stride along D.
inline GatedNormZ check_gated_rms_norm_args(const at::Tensor& out, const at::Tensor& x,
                                            const at::Tensor& z, const at::Tensor& weight,
                                            const char* op) {
  SPLITVL_CHECK(x.dim() == 2 && x.stride(1) == 1, op,
              ": x must be [N, D] with unit stride along D, got ", x.sizes(), " strides ",
              x.strides());
  la_check_float_dtype(x, op, "x");
  const bool grouped = z.dim() == 3;
  const bool z_shape = grouped ? z.size(0) * z.size(1) == x.size(0) && z.size(2) == x.size(1)
                               : z.sizes() == x.sizes();
  SPLITVL_CHECK(z_shape && z.stride(-1) == 1 && z.scalar_type() == x.scalar_type(), op,
              ": z must be [N, D] = ", x.sizes(), " or [N / H, H, D] of x's dtype with unit stride "
              "along D, got ", z.sizes(), " strides ", z.strides(), " ", z.scalar_type());
  SPLITVL_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), op,
              ": weight must be contiguous [", x.size(1), "], got ", weight.sizes());
  SPLITVL_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, op,
              ": weight must be float32 or x's dtype, got ", weight.scalar_type());
  SPLITVL_CHECK(out.sizes() == x.sizes() && out.is_contiguous() &&
                  out.scalar_type() == x.scalar_type(),
              op, ": out must be contiguous ", x.sizes(), " of x's dtype");
  for (const at::Tensor* t : {&out, &z, &weight}) la_check_same_device(x, *t, op, "a tensor argument");
  return grouped ? GatedNormZ{z.size(1), z.stride(0), z.stride(1)} : GatedNormZ{1, z.stride(0), 0};
}

inline void check_gdn_gating_args(const at::Tensor& g, const at::Tensor& beta, const at::Tensor& ba,
                                  const at::Tensor& A_log, const at::Tensor& dt_bias,
                                  const char* op) {
  la_check_float_dtype(ba, op, "ba");
  const int64_t hv = A_log.numel();
  SPLITVL_CHECK(ba.dim() == 2 && ba.size(1) == 2 * hv && (ba.stride(1) == 1 || hv == 0), op,
              ": ba must be [T, 2 * Hv] (Hv = ", hv, ") with unit stride along it, got ", ba.sizes(),
              " strides ", ba.strides());
  for (const at::Tensor* t : {&A_log, &dt_bias}) {
    SPLITVL_CHECK(t->dim() == 1 && t->size(0) == hv && t->is_contiguous() &&
                    t->scalar_type() == at::kFloat,
                op, ": A_log and dt_bias must be contiguous float32 [", hv, "], got ", t->sizes(),
                " ", t->scalar_type());
  }
  for (const at::Tensor* t : {&g, &beta}) {
    SPLITVL_CHECK(t->dim() == 2 && t->size(0) == ba.size(0) && t->size(1) == hv &&
                    t->is_contiguous() && t->scalar_type() == at::kFloat,
                op, ": g and beta must be contiguous float32 [", ba.size(0), ", ", hv, "], got ",
                t->sizes(), " ", t->scalar_type());
  }
  for (const at::Tensor* t : {&g, &beta, &A_log, &dt_bias}) {
    la_check_same_device(ba, *t, op, "a tensor argument");
  }
}

// gated_delta_net_decode: the layer's sizes, all derived from the argument shapes.
struct GdnDecodeDims {
  int64_t batch, hk, hv, dk, dv, conv_dim, width, key_dim;
};

inline GdnDecodeDims check_gated_delta_net_decode(
    const at::Tensor& out, const at::Tensor& proj, const at::Tensor& conv_weight,
    const at::Tensor& conv_states, const at::Tensor& A_log, const at::Tensor& dt_bias,
    const at::Tensor& recurrent_states, const at::Tensor& state_indices,
    const at::Tensor& norm_weight) {
  constexpr const char* op = "gated_delta_net_decode";
  la_check_float_dtype(proj, op, "proj");
  SPLITVL_CHECK(conv_weight.dim() == 2 && conv_weight.size(1) >= 2 && conv_weight.is_contiguous() &&
                    conv_weight.scalar_type() == proj.scalar_type(),
                op, ": conv_weight must be contiguous [conv_dim, width >= 2] of proj's dtype, got ",
                conv_weight.sizes(), " ", conv_weight.scalar_type());
  SPLITVL_CHECK(recurrent_states.dim() == 4 && A_log.dim() == 1 && norm_weight.dim() == 1, op,
                ": recurrent_states must be [num_slots, Hv, Dk, Dv], A_log [Hv], norm_weight [Dv]");
  const int64_t conv_dim = conv_weight.size(0), width = conv_weight.size(1);
  const int64_t hv = A_log.size(0), dv = norm_weight.size(0), dk = recurrent_states.size(2);
  const int64_t key_dim2 = conv_dim - hv * dv;
  SPLITVL_CHECK(hv > 0 && dv > 0 && dk > 0 && key_dim2 > 0 && key_dim2 % (2 * dk) == 0, op,
                ": conv_dim ", conv_dim, " must be 2 Hk Dk + Hv Dv with Hv = ", hv, ", Dv = ", dv,
                ", Dk = ", dk);
  const int64_t key_dim = key_dim2 / 2, hk = key_dim / dk;
  SPLITVL_CHECK(hv % hk == 0, op, ": value heads (", hv, ") must be a multiple of key heads (", hk, ")");
  SPLITVL_CHECK(proj.dim() == 2 && proj.size(1) == conv_dim + hv * dv + 2 * hv && proj.stride(1) == 1,
                op, ": proj must be [B, ", conv_dim + hv * dv + 2 * hv,
                "] (q | k | v | z | b | a) with unit column stride, got ", proj.sizes(), " strides ",
                proj.strides());
  SPLITVL_CHECK(conv_states.dim() == 3 && conv_states.size(1) == conv_dim &&
                    conv_states.size(2) == width - 1 && conv_states.is_contiguous() &&
                    conv_states.scalar_type() == proj.scalar_type(),
                op, ": conv_states must be contiguous [num_slots, ", conv_dim, ", ", width - 1,
                "] of proj's dtype, got ", conv_states.sizes(), " ", conv_states.scalar_type());
  SPLITVL_CHECK(recurrent_states.size(1) == hv && recurrent_states.size(3) == dv &&
                    recurrent_states.is_contiguous() && recurrent_states.scalar_type() == at::kFloat,
                op, ": recurrent_states must be contiguous float32 [num_slots, ", hv, ", Dk, ", dv,
                "], got ", recurrent_states.sizes(), " ", recurrent_states.scalar_type());
  for (const at::Tensor* t : {&A_log, &dt_bias}) {
    SPLITVL_CHECK(t->dim() == 1 && t->size(0) == hv && t->is_contiguous() &&
                      t->scalar_type() == at::kFloat,
                  op, ": A_log and dt_bias must be contiguous float32 [", hv, "], got ", t->sizes(),
                  " ", t->scalar_type());
  }
  SPLITVL_CHECK(norm_weight.is_contiguous() && (norm_weight.scalar_type() == proj.scalar_type() ||
                                                norm_weight.scalar_type() == at::kFloat),
                op, ": norm_weight must be contiguous, float32 or proj's dtype, got ",
                norm_weight.scalar_type());
  const int64_t batch = la_check_sequences(proj, proj.size(0), nullptr, state_indices, std::nullopt, op);
  SPLITVL_CHECK(out.dim() == 3 && out.size(0) == batch && out.size(1) == hv && out.size(2) == dv &&
                    out.is_contiguous() && out.scalar_type() == proj.scalar_type(),
                op, ": out must be contiguous [", batch, ", ", hv, ", ", dv, "] of proj's dtype");
  for (const at::Tensor* t : {&out, &conv_weight, &conv_states, &A_log, &dt_bias, &recurrent_states,
                              &norm_weight}) {
    la_check_same_device(proj, *t, op, "a tensor argument");
  }
  return {batch, hk, hv, dk, dv, conv_dim, width, key_dim};
}

}  // namespace splitvl
