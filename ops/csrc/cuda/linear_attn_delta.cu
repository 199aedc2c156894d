// CUDA kernels: gated delta rule over packed sequences (prefill) and the
// one-token recurrent step (decode), fp32 state in a slot pool.
//
// This is the sequential-over-tokens form: one CTA per (sequence, value head,
// 32-column tile of Dv) keeps its Dk x 32 slice of the state in shared memory
// and steps through the tokens. Columns of the state evolve independently
// (S[:, j] only meets v[j]), so tiling Dv needs no communication between CTAs.
// It runs the decode step, the prefill's short sequences (a mixed step's decode rows,
// kChunkedShortLen tokens at most: max_len skips the others) and the whole prefill only for
// head dims the chunk-parallel kernels (linear_attn_delta_chunked.cu) do not take.
// Semantics: ops/reference_linear_attn.py (gated_delta_rule_chunked / _recurrent).
#include <c10/cuda/CUDAException.h>

#include "../linear_attn_checks.h"
#include "common.cuh"
#include "linear_attn_delta_chunked.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kTile = 32;    // state columns per CTA (one per lane)
constexpr int kGroups = 4;   // warps; warp w owns state rows w, w + 4, ...
constexpr int kThreads = kTile * kGroups;
constexpr int kMaxHeadDim = 256;
constexpr float kL2Eps = 1e-6f;

struct DeltaArgs {
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head;
  int hk, hv, dk, dv, num_slots;
  float scale;
  bool l2norm;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    delta_rule_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ q,
                      const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                      const float* __restrict__ g, const float* __restrict__ beta,
                      const int32_t* __restrict__ cu, float* __restrict__ states,
                      const int32_t* __restrict__ slots, const bool* __restrict__ has_init,
                      DeltaArgs a, int64_t max_len) {
  extern __shared__ float smem[];
  float* S = smem;                 // [dk][kTile]
  float* qs = S + a.dk * kTile;    // [dk]
  float* ks = qs + a.dk;           // [dk]
  float* red = ks + a.dk;          // [kGroups][kTile]
  __shared__ float scratch[32];
  const int b = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % kTile, grp = threadIdx.x / kTile;
  const int col = blockIdx.z * kTile + lane;
  const bool valid = col < a.dv;
  const int hq = h / (a.hv / a.hk);
  const int64_t begin = cu != nullptr ? cu[b] : b;
  const int64_t end = cu != nullptr ? cu[b + 1] : b + 1;
  if (max_len >= 0 && end - begin > max_len) return;  // the chunked kernels run it
  const int slot = slots[b];
  CUDA_KERNEL_ASSERT(slot < a.num_slots);
  const bool use_state = slot >= 0 && (has_init == nullptr || has_init[b]);
  float* slot_state =
      slot >= 0 ? states + (static_cast<int64_t>(slot) * a.hv + h) * a.dk * a.dv : nullptr;
  for (int i = grp; i < a.dk; i += kGroups) {
    S[i * kTile + lane] = use_state && valid ? slot_state[static_cast<int64_t>(i) * a.dv + col] : 0.f;
  }
  for (int64_t t = begin; t < end; ++t) {
    float sq = 0.f, sk = 0.f;
    for (int i = threadIdx.x; i < a.dk; i += kThreads) {
      const float qv = to_float(q[t * a.q_tok + hq * a.q_head + i]);
      const float kv = to_float(k[t * a.k_tok + hq * a.k_head + i]);
      qs[i] = qv;
      ks[i] = kv;
      sq += qv * qv;
      sk += kv * kv;
    }
    float q_scale = a.scale, k_scale = 1.f;
    if (a.l2norm) {
      q_scale *= rsqrtf(block_sum(sq, scratch) + kL2Eps);
      k_scale = rsqrtf(block_sum(sk, scratch) + kL2Eps);
    }
    __syncthreads();  // qs, ks visible
    const float decay = expf(g[t * a.hv + h]);
    const float bt = beta[t * a.hv + h];
    const float vv = valid ? to_float(v[t * a.v_tok + h * a.v_head + col]) : 0.f;
    // kv_mem = (decay S)^T k
    float part = 0.f;
    for (int i = grp; i < a.dk; i += kGroups) {
      const float s = S[i * kTile + lane] * decay;
      S[i * kTile + lane] = s;
      part += s * ks[i];
    }
    red[grp * kTile + lane] = part;
    __syncthreads();
    float kv_mem = 0.f;
#pragma unroll
    for (int w = 0; w < kGroups; ++w) kv_mem += red[w * kTile + lane];
    const float delta = (vv - kv_mem * k_scale) * bt * k_scale;
    __syncthreads();  // red is reused below
    // S += k delta^T; o = S^T q
    part = 0.f;
    for (int i = grp; i < a.dk; i += kGroups) {
      const float s = S[i * kTile + lane] + ks[i] * delta;
      S[i * kTile + lane] = s;
      part += s * qs[i];
    }
    red[grp * kTile + lane] = part;
    __syncthreads();
    if (grp == 0 && valid) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kGroups; ++w) o += red[w * kTile + lane];
      out[(t * a.hv + h) * a.dv + col] = from_float<scalar_t>(o * q_scale);
    }
    __syncthreads();  // qs, ks, red are overwritten by the next token
  }
  if (slot_state != nullptr && valid) {
    for (int i = grp; i < a.dk; i += kGroups) {
      slot_state[static_cast<int64_t>(i) * a.dv + col] = S[i * kTile + lane];
    }
  }
}

void launch_delta_rule(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                       const int32_t* cu, at::Tensor& states, const at::Tensor& state_indices,
                       const bool* has_init, int64_t batch, bool l2norm, const char* op,
                       int64_t max_len = -1) {
  check_cuda(q, op, "q");
  const int dk = static_cast<int>(q.size(2)), dv = static_cast<int>(v.size(2));
  SPLITVL_CHECK(dk <= kMaxHeadDim, op, ": key head dim ", dk, " > ", kMaxHeadDim, " is not supported");
  if (batch == 0 || dv == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const DeltaArgs a{q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    static_cast<int>(q.size(1)), static_cast<int>(v.size(1)), dk, dv,
                    static_cast<int>(states.size(0)), 1.f / sqrtf(static_cast<float>(dk)), l2norm};
  SPLITVL_CHECK(a.hv <= 65535, op, ": too many value heads");
  const dim3 grid(static_cast<unsigned>(batch), a.hv, ceil_div(dv, kTile));
  const size_t smem = sizeof(float) * (dk * kTile + 2 * dk + kGroups * kTile);
  SPLITVL_DISPATCH_FLOAT(q.scalar_type(), op, [&] {
    delta_rule_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        reinterpret_cast<scalar_t*>(out.data_ptr()),
        reinterpret_cast<const scalar_t*>(q.data_ptr()),
        reinterpret_cast<const scalar_t*>(k.data_ptr()),
        reinterpret_cast<const scalar_t*>(v.data_ptr()), g.data_ptr<float>(),
        beta.data_ptr<float>(), cu, states.data_ptr<float>(), state_indices.data_ptr<int32_t>(),
        has_init, a, max_len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void gated_delta_rule_chunked(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& g,
                              const at::Tensor& beta, const at::Tensor& cu_seqlens,
                              at::Tensor& states, const at::Tensor& state_indices,
                              const std::optional<at::Tensor>& has_initial_state,
                              bool use_qk_l2norm) {
  const LinearAttnCall call = check_gated_delta_rule_chunked(
      out, q, k, v, g, beta, cu_seqlens, states, state_indices, has_initial_state);
  const bool* has_init = has_initial_state.has_value() ? has_initial_state->data_ptr<bool>() : nullptr;
  check_cuda(q, call.op, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  if (launch_gated_delta_rule_chunked(out, q, k, v, g, beta, cu_seqlens, states, state_indices,
                                      has_init, call.batch, use_qk_l2norm, kChunkedShortLen)) {
    // Short sequences (decode rows) can only be absent when one sequence holds more tokens.
    if (call.batch > 1 || q.size(0) <= kChunkedShortLen) {
      launch_delta_rule(out, q, k, v, g, beta, cu_seqlens.data_ptr<int32_t>(), states, state_indices,
                        has_init, call.batch, use_qk_l2norm, call.op, kChunkedShortLen);
    }
    return;
  }
  launch_delta_rule(out, q, k, v, g, beta, cu_seqlens.data_ptr<int32_t>(), states, state_indices,
                    has_init, call.batch, use_qk_l2norm, call.op);
}

void gated_delta_rule_recurrent(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& g,
                                const at::Tensor& beta, at::Tensor& states,
                                const at::Tensor& state_indices, bool use_qk_l2norm) {
  const LinearAttnCall call =
      check_gated_delta_rule_recurrent(out, q, k, v, g, beta, states, state_indices);
  launch_delta_rule(out, q, k, v, g, beta, nullptr, states, state_indices, nullptr, call.batch,
                    use_qk_l2norm, call.op);
}

}  // namespace splitvl::cuda
