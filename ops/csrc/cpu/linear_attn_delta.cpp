// CPU kernels: gated delta rule, chunked prefill (UT-transform form, chunk 64)
// over packed sequences and the one-token recurrent decode step. One task per
// (sequence, value head); the Dk x Dv state and all accumulation are fp32.
// Semantics: ops/reference_linear_attn.py (gated_delta_rule_chunked / _recurrent).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../linear_attn_checks.h"
#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

constexpr int64_t kChunk = 64;
constexpr float kL2Eps = 1e-6f;

struct Dims {
  int64_t hk, hv, dk, dv, num_slots;
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head;  // strides of q, k, v
};

Dims make_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& states) {
  return Dims{q.size(1),   v.size(1),   q.size(2),   v.size(2),   states.size(0), q.stride(0),
              q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1)};
}

// What both kernels read and write: sizes, strides and data of the checked arguments.
template <typename scalar_t>
struct DeltaData {
  Dims dm;
  int64_t group;  // value heads per query/key head
  float scale;    // Dk^-0.5, applied to q
  const scalar_t *q, *k, *v;
  const float *g, *beta;
  float* states;
  scalar_t* out;
};

template <typename scalar_t>
DeltaData<scalar_t> delta_data(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                               at::Tensor& states) {
  const Dims dm = make_dims(q, k, v, states);
  return {dm, dm.hv / dm.hk, 1.f / std::sqrt(static_cast<float>(dm.dk)),
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          g.data_ptr<float>(), beta.data_ptr<float>(), states.data_ptr<float>(),
          out.data_ptr<scalar_t>()};
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// dst[i] = src[i] as fp32, optionally l2-normalized, times `scale`.
template <typename scalar_t>
void load_vec(float* dst, const scalar_t* src, int64_t n, bool l2norm, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  if (l2norm) {
    const float inv = 1.f / std::sqrt(dot(dst, dst, n) + kL2Eps);
    for (int64_t i = 0; i < n; ++i) dst[i] *= inv;
  }
  if (scale != 1.f) {
    for (int64_t i = 0; i < n; ++i) dst[i] *= scale;
  }
}

// Per-task scratch of one chunk (C <= 64 tokens).
struct ChunkBuffers {
  std::vector<float> q, k, v, u, w, vnew, a, cum, beta;
  ChunkBuffers(int64_t dk, int64_t dv)
      : q(kChunk * dk), k(kChunk * dk), v(kChunk * dv), u(kChunk * dv), w(kChunk * dk),
        vnew(kChunk * dv), a(kChunk * kChunk), cum(kChunk), beta(kChunk) {}
};

// One chunk of C tokens for one head: reads buf.{q,k,v,cum,beta}, writes o [C, dv]
// (fp32, row-major) and advances `state` [dk, dv].
void chunk_step(ChunkBuffers& buf, int64_t c, int64_t dk, int64_t dv, float* state, float* o) {
  float *q = buf.q.data(), *k = buf.k.data(), *u = buf.u.data(), *w = buf.w.data();
  float *a = buf.a.data(), *vn = buf.vnew.data();
  const float* cum = buf.cum.data();
  // Strictly lower UT system A[i][j] = beta_i (k_i . k_j) exp(cum_i - cum_j); solve
  // (I + A) U = beta v and (I + A) W = beta exp(cum) k by forward substitution.
  for (int64_t i = 0; i < c; ++i) {
    const float bi = buf.beta[i];
    for (int64_t j = 0; j < i; ++j) {
      a[i * kChunk + j] = bi * dot(k + i * dk, k + j * dk, dk) * std::exp(cum[i] - cum[j]);
    }
    const float ei = std::exp(cum[i]);
    for (int64_t e = 0; e < dv; ++e) u[i * dv + e] = bi * buf.v[i * dv + e];
    for (int64_t d = 0; d < dk; ++d) w[i * dk + d] = bi * ei * k[i * dk + d];
    for (int64_t j = 0; j < i; ++j) {
      const float aij = a[i * kChunk + j];
      for (int64_t e = 0; e < dv; ++e) u[i * dv + e] -= aij * u[j * dv + e];
      for (int64_t d = 0; d < dk; ++d) w[i * dk + d] -= aij * w[j * dk + d];
    }
  }
  // v_new = U - W S, the part of the values the carried state does not predict.
  for (int64_t i = 0; i < c; ++i) {
    float* row = vn + i * dv;
    std::copy(u + i * dv, u + (i + 1) * dv, row);
    for (int64_t d = 0; d < dk; ++d) {
      const float wid = w[i * dk + d];
      const float* s = state + d * dv;
      for (int64_t e = 0; e < dv; ++e) row[e] -= wid * s[e];
    }
  }
  // o_i = exp(cum_i) q_i S + sum_{j <= i} (q_i . k_j) exp(cum_i - cum_j) v_new_j.
  for (int64_t i = 0; i < c; ++i) {
    float* oi = o + i * dv;
    std::fill(oi, oi + dv, 0.f);
    for (int64_t d = 0; d < dk; ++d) {
      const float qd = q[i * dk + d];
      const float* s = state + d * dv;
      for (int64_t e = 0; e < dv; ++e) oi[e] += qd * s[e];
    }
    const float ei = std::exp(cum[i]);
    for (int64_t e = 0; e < dv; ++e) oi[e] *= ei;
    for (int64_t j = 0; j <= i; ++j) {
      const float att = dot(q + i * dk, k + j * dk, dk) * std::exp(cum[i] - cum[j]);
      for (int64_t e = 0; e < dv; ++e) oi[e] += att * vn[j * dv + e];
    }
  }
  // S = exp(cum_last) S + sum_j exp(cum_last - cum_j) k_j^T v_new_j.
  const float last = cum[c - 1];
  const float chunk_decay = std::exp(last);
  for (int64_t j = 0; j < c; ++j) {
    const float dj = std::exp(last - cum[j]);
    for (int64_t d = 0; d < dk; ++d) k[j * dk + d] *= dj;
  }
  for (int64_t d = 0; d < dk; ++d) {
    float* s = state + d * dv;
    for (int64_t e = 0; e < dv; ++e) s[e] *= chunk_decay;
    for (int64_t j = 0; j < c; ++j) {
      const float kjd = k[j * dk + d];
      const float* vj = vn + j * dv;
      for (int64_t e = 0; e < dv; ++e) s[e] += kjd * vj[e];
    }
  }
}

template <typename scalar_t>
void chunked_impl(const DeltaData<scalar_t>& d, const int32_t* cu, const int32_t* slots,
                  const bool* has_init, int64_t batch, bool l2norm) {
  const Dims& dm = d.dm;
  at::parallel_for(0, batch * dm.hv, 1, [&](int64_t lo, int64_t hi) {
    ChunkBuffers buf(dm.dk, dm.dv);
    std::vector<float> state(dm.dk * dm.dv), o(kChunk * dm.dv);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / dm.hv, h = task % dm.hv, hq = h / d.group;
      float* slot_state = slots[b] >= 0 ? d.states + (slots[b] * dm.hv + h) * dm.dk * dm.dv : nullptr;
      if (slot_state != nullptr && (has_init == nullptr || has_init[b])) {
        std::copy(slot_state, slot_state + dm.dk * dm.dv, state.begin());
      } else {
        std::fill(state.begin(), state.end(), 0.f);
      }
      for (int64_t c0 = cu[b]; c0 < cu[b + 1]; c0 += kChunk) {
        const int64_t c = std::min<int64_t>(kChunk, cu[b + 1] - c0);
        float running = 0.f;
        for (int64_t i = 0; i < c; ++i) {
          const int64_t t = c0 + i;
          load_vec(buf.q.data() + i * dm.dk, d.q + t * dm.q_tok + hq * dm.q_head, dm.dk, l2norm, d.scale);
          load_vec(buf.k.data() + i * dm.dk, d.k + t * dm.k_tok + hq * dm.k_head, dm.dk, l2norm, 1.f);
          load_vec(buf.v.data() + i * dm.dv, d.v + t * dm.v_tok + h * dm.v_head, dm.dv, false, 1.f);
          running += d.g[t * dm.hv + h];
          buf.cum[i] = running;
          buf.beta[i] = d.beta[t * dm.hv + h];
        }
        chunk_step(buf, c, dm.dk, dm.dv, state.data(), o.data());
        for (int64_t i = 0; i < c; ++i) {
          scalar_t* dst = d.out + ((c0 + i) * dm.hv + h) * dm.dv;
          for (int64_t e = 0; e < dm.dv; ++e) dst[e] = static_cast<scalar_t>(o[i * dm.dv + e]);
        }
      }
      if (slot_state != nullptr) std::copy(state.begin(), state.end(), slot_state);
    }
  });
}

template <typename scalar_t>
void recurrent_impl(const DeltaData<scalar_t>& d, const int32_t* slots, int64_t batch,
                    bool l2norm) {
  const Dims& dm = d.dm;
  at::parallel_for(0, batch * dm.hv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> qv(dm.dk), kv(dm.dk), vv(dm.dv), o(dm.dv), scratch(dm.dk * dm.dv);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / dm.hv, h = task % dm.hv, hq = h / d.group;
      float* s = slots[b] >= 0 ? d.states + (slots[b] * dm.hv + h) * dm.dk * dm.dv : scratch.data();
      if (slots[b] < 0) std::fill(scratch.begin(), scratch.end(), 0.f);
      load_vec(qv.data(), d.q + b * dm.q_tok + hq * dm.q_head, dm.dk, l2norm, d.scale);
      load_vec(kv.data(), d.k + b * dm.k_tok + hq * dm.k_head, dm.dk, l2norm, 1.f);
      load_vec(vv.data(), d.v + b * dm.v_tok + h * dm.v_head, dm.dv, false, 1.f);
      const float decay = std::exp(d.g[b * dm.hv + h]), bt = d.beta[b * dm.hv + h];
      // delta = beta (v - (decay S)^T k); S = decay S + k delta^T; o = S^T q.
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t d = 0; d < dm.dk; ++d) {
        float* row = s + d * dm.dv;
        for (int64_t e = 0; e < dm.dv; ++e) {
          row[e] *= decay;
          o[e] += row[e] * kv[d];
        }
      }
      for (int64_t e = 0; e < dm.dv; ++e) vv[e] = (vv[e] - o[e]) * bt;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t d = 0; d < dm.dk; ++d) {
        float* row = s + d * dm.dv;
        for (int64_t e = 0; e < dm.dv; ++e) {
          row[e] += kv[d] * vv[e];
          o[e] += row[e] * qv[d];
        }
      }
      scalar_t* dst = d.out + (b * dm.hv + h) * dm.dv;
      for (int64_t e = 0; e < dm.dv; ++e) dst[e] = static_cast<scalar_t>(o[e]);
    }
  });
}

}  // namespace

void gated_delta_rule_chunked(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                              const at::Tensor& cu_seqlens, at::Tensor& states,
                              const at::Tensor& state_indices,
                              const std::optional<at::Tensor>& has_initial_state,
                              bool use_qk_l2norm) {
  const LinearAttnCall call = check_gated_delta_rule_chunked(
      out, q, k, v, g, beta, cu_seqlens, states, state_indices, has_initial_state);
  check_seqlens_and_slots(cu_seqlens, state_indices, q.size(0), states.size(0), call.op);
  const bool* has_init = has_initial_state.has_value() ? has_initial_state->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gated_delta_rule_chunked", [&] {
    chunked_impl(delta_data<scalar_t>(out, q, k, v, g, beta, states), cu_seqlens.data_ptr<int32_t>(),
                 state_indices.data_ptr<int32_t>(), has_init, call.batch, use_qk_l2norm);
  });
}

void gated_delta_rule_recurrent(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& g,
                                const at::Tensor& beta, at::Tensor& states,
                                const at::Tensor& state_indices, bool use_qk_l2norm) {
  const LinearAttnCall call =
      check_gated_delta_rule_recurrent(out, q, k, v, g, beta, states, state_indices);
  check_seqlens_and_slots(at::Tensor(), state_indices, q.size(0), states.size(0), call.op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gated_delta_rule_recurrent", [&] {
    recurrent_impl(delta_data<scalar_t>(out, q, k, v, g, beta, states),
                   state_indices.data_ptr<int32_t>(), call.batch, use_qk_l2norm);
  });
}

}  // namespace splitvl::cpu
