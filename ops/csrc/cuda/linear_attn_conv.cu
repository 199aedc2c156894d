// CUDA kernels: depthwise causal conv1d over packed sequences (prefill) and its
// one-token update (decode), conv states in a slot pool.
// Semantics: ops/reference_linear_attn.py (causal_conv1d_fwd / _update).
#include <c10/cuda/CUDAException.h>

#include "../linear_attn_checks.h"
#include "common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float silu_dev(float v) { return v / (1.f + __expf(-v)); }

// Index of the sequence holding token t: the last b with cu[b] <= t (and cu[b+1] > t).
__device__ __forceinline__ int find_sequence(const int32_t* cu, int batch, int64_t t) {
  int lo = 0, hi = batch;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (cu[mid] <= t) lo = mid; else hi = mid;
  }
  return lo;
}

struct ConvArgs {
  int64_t tokens, dim, width, x_stride, num_slots;
  int batch;
  bool silu;
};

// One thread per (token, channel). Positions before the sequence start read the
// initial state (the last width-1 inputs of the previous chunk) or zeros.
template <typename scalar_t>
__global__ void conv_fwd_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ weight,
                                const scalar_t* __restrict__ bias, const scalar_t* states,
                                const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                                const bool* __restrict__ has_init, ConvArgs a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.tokens * a.dim) return;
  const int64_t t = idx / a.dim, c = idx % a.dim, hist = a.width - 1;
  const int b = find_sequence(cu, a.batch, t);
  const int64_t rel = t - cu[b];
  const int slot = slots[b];
  CUDA_KERNEL_ASSERT(slot < a.num_slots);
  const bool use_state = slot >= 0 && (has_init == nullptr || has_init[b]);
  const scalar_t* init =
      use_state ? states + (static_cast<int64_t>(slot) * a.dim + c) * hist : nullptr;
  float acc = bias != nullptr ? to_float(bias[c]) : 0.f;
  for (int64_t j = 0; j < a.width; ++j) {
    const int64_t p = rel - hist + j;
    float in = 0.f;
    if (p >= 0) in = to_float(x[(t - hist + j) * a.x_stride + c]);
    else if (use_state) in = to_float(init[hist + p]);
    acc += to_float(weight[c * a.width + j]) * in;
  }
  float y = to_float(from_float<scalar_t>(acc));  // rounded before SiLU, as the reference
  if (a.silu) y = silu_dev(y);
  out[t * a.dim + c] = from_float<scalar_t>(y);
}

// One thread per (sequence, channel): new state = the last width-1 inputs.
// Runs after conv_fwd_kernel (same stream), which read the old states.
template <typename scalar_t>
__global__ void conv_state_kernel(const scalar_t* __restrict__ x, scalar_t* states,
                                  const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                                  const bool* __restrict__ has_init, ConvArgs a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.batch * a.dim) return;
  const int b = static_cast<int>(idx / a.dim);
  const int64_t c = idx % a.dim, hist = a.width - 1;
  const int slot = slots[b];
  if (slot < 0) return;
  const bool use_state = has_init == nullptr || has_init[b];
  const int64_t begin = cu[b], len = cu[b + 1] - cu[b];
  scalar_t* st = states + (static_cast<int64_t>(slot) * a.dim + c) * hist;
  // In-order writes: entry j is written before entries > j are read.
  for (int64_t j = 0; j < hist; ++j) {
    const int64_t p = len - hist + j;
    scalar_t v;
    if (p >= 0) v = x[(begin + p) * a.x_stride + c];
    else v = use_state ? st[len + j] : from_float<scalar_t>(0.f);
    st[j] = v;
  }
}

// Decode: one thread per (sequence, channel); reads the state, then shifts it.
template <typename scalar_t>
__global__ void conv_update_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ weight,
                                   const scalar_t* __restrict__ bias, scalar_t* states,
                                   const int32_t* __restrict__ slots, ConvArgs a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.batch * a.dim) return;
  const int b = static_cast<int>(idx / a.dim);
  const int64_t c = idx % a.dim, hist = a.width - 1;
  const int slot = slots[b];
  CUDA_KERNEL_ASSERT(slot < a.num_slots);
  scalar_t* st = slot >= 0 ? states + (static_cast<int64_t>(slot) * a.dim + c) * hist : nullptr;
  const scalar_t xv = x[b * a.x_stride + c];
  float acc = bias != nullptr ? to_float(bias[c]) : 0.f;
  for (int64_t j = 0; j < hist; ++j) {
    if (st != nullptr) acc += to_float(weight[c * a.width + j]) * to_float(st[j]);
  }
  acc += to_float(weight[c * a.width + hist]) * to_float(xv);
  float y = to_float(from_float<scalar_t>(acc));
  if (a.silu) y = silu_dev(y);
  out[b * a.dim + c] = from_float<scalar_t>(y);
  if (st == nullptr) return;
  for (int64_t j = 0; j + 1 < hist; ++j) st[j] = st[j + 1];
  if (hist > 0) st[hist - 1] = xv;
}

ConvArgs make_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& states,
                   int64_t batch, bool silu) {
  return ConvArgs{x.size(0), x.size(1), weight.size(1), x.stride(0), states.size(0),
                  static_cast<int>(batch), silu};
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

}  // namespace

void causal_conv1d_fwd(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                       const at::Tensor& cu_seqlens, const at::Tensor& state_indices,
                       const std::optional<at::Tensor>& has_initial_state, bool silu) {
  const char* op = "causal_conv1d_fwd";
  const int64_t batch = check_conv1d_args(out, x, weight, bias, conv_states, &cu_seqlens,
                                          state_indices, has_initial_state, op);
  check_cuda(x, op, "x");
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ConvArgs a = make_args(x, weight, conv_states, batch, silu);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* slots = state_indices.data_ptr<int32_t>();
  const bool* has_init = opt_ptr<bool>(has_initial_state);
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    auto* states_p = reinterpret_cast<scalar_t*>(conv_states.data_ptr());
    const auto* x_p = reinterpret_cast<const scalar_t*>(x.data_ptr());
    if (a.tokens > 0) {
      conv_fwd_kernel<scalar_t><<<ceil_div(a.tokens * a.dim, kThreads), kThreads, 0, stream>>>(
          reinterpret_cast<scalar_t*>(out.data_ptr()), x_p,
          reinterpret_cast<const scalar_t*>(weight.data_ptr()), opt_ptr<scalar_t>(bias), states_p,
          cu, slots, has_init, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    conv_state_kernel<scalar_t><<<ceil_div(batch * a.dim, kThreads), kThreads, 0, stream>>>(
        x_p, states_p, cu, slots, has_init, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void causal_conv1d_update(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                          const at::Tensor& state_indices, bool silu) {
  const char* op = "causal_conv1d_update";
  const int64_t batch = check_conv1d_args(out, x, weight, bias, conv_states, nullptr,
                                          state_indices, std::nullopt, op);
  check_cuda(x, op, "x");
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ConvArgs a = make_args(x, weight, conv_states, batch, silu);
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    conv_update_kernel<scalar_t><<<ceil_div(batch * a.dim, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<scalar_t*>(out.data_ptr()),
        reinterpret_cast<const scalar_t*>(x.data_ptr()),
        reinterpret_cast<const scalar_t*>(weight.data_ptr()), opt_ptr<scalar_t>(bias),
        reinterpret_cast<scalar_t*>(conv_states.data_ptr()), state_indices.data_ptr<int32_t>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace splitvl::cuda
