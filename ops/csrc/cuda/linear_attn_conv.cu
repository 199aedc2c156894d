// CUDA kernels: depthwise causal conv1d over packed sequences (prefill) and its
// one-token update (decode), conv states in a slot pool.
// Semantics: ops/reference_linear_attn.py (causal_conv1d_fwd / _update).
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "../linear_attn_checks.h"
#include "common.cuh"
#include "linear_attn_common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRun = 16;  // tokens per thread of the vectorized prefill kernel
constexpr int kConvMinBlocks = 3;  // CTAs per SM the prefill kernel keeps resident (<= 168 registers)

__device__ __forceinline__ float silu_dev(float v) { return v / (1.f + __expf(-v)); }

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

// A thread of the one-thread-per-(sequence, channel) kernels: sequence b (-1 past the
// last thread), channel c, b's slot and that slot's conv state of channel c (null without a slot).
template <typename scalar_t>
struct SlotChannel {
  int b;
  int64_t c;
  int slot;
  scalar_t* state;
};

template <typename scalar_t>
__device__ __forceinline__ SlotChannel<scalar_t> slot_channel(scalar_t* states,
                                                              const int32_t* __restrict__ slots,
                                                              const ConvArgs& a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.batch * a.dim) return {-1, 0, -1, nullptr};
  const int b = static_cast<int>(idx / a.dim);
  const int64_t c = idx % a.dim;
  const int slot = slots[b];
  return {b, c, slot,
          slot >= 0 ? states + (static_cast<int64_t>(slot) * a.dim + c) * (a.width - 1) : nullptr};
}

// One thread per (sequence, channel): new state = the last width-1 inputs.
// Runs after conv_fwd_kernel (same stream), which read the old states.
template <typename scalar_t>
__global__ void conv_state_kernel(const scalar_t* __restrict__ x, scalar_t* states,
                                  const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                                  const bool* __restrict__ has_init, ConvArgs a) {
  const SlotChannel<scalar_t> t = slot_channel(states, slots, a);
  if (t.b < 0 || t.state == nullptr) return;
  const int b = t.b;
  const int64_t c = t.c, hist = a.width - 1;
  const bool use_state = has_init == nullptr || has_init[b];
  const int64_t begin = cu[b], len = cu[b + 1] - cu[b];
  scalar_t* st = t.state;
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
  const SlotChannel<scalar_t> t = slot_channel(states, slots, a);
  if (t.b < 0) return;
  const int b = t.b;
  const int64_t c = t.c, hist = a.width - 1;
  CUDA_KERNEL_ASSERT(t.slot < a.num_slots);
  scalar_t* st = t.state;
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

// Channels c0 .. c0 + kVec - 1: their weights ([dim, kWidth], kVec * kWidth contiguous
// values) as kWidth rows, and their bias as one; 16-byte loads when kVec packs 16 bytes.
// Kept as loaded (half the registers of floats for 16-bit types: the prefill kernel spends
// its registers on input rows in flight) and widened at use.
template <typename scalar_t, int kVec, int kWidth>
struct ConvTaps {
  Words<scalar_t, kVec> raw[kWidth], bias;

  __device__ __forceinline__ ConvTaps(const scalar_t* __restrict__ weight, const scalar_t* __restrict__ b,
                                      int64_t c0) {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) raw[k] = load_words<scalar_t, kVec>(weight + (c0 * kWidth + k * kVec));
    if (b != nullptr) {
      bias = load_words<scalar_t, kVec>(b + c0);
    } else {
      Pack<scalar_t, kVec> zero;
#pragma unroll
      for (int e = 0; e < kVec; ++e) zero.v[e] = from_float<scalar_t>(0.f);
      bias = to_words<scalar_t, kVec>(zero);
    }
  }
  // Tap j of channel c0 + e.
  __device__ __forceinline__ float w(int j, int e) const {
    return word_value<scalar_t, kVec>(raw[(e * kWidth + j) / kVec], (e * kWidth + j) % kVec);
  }
  __device__ __forceinline__ float b(int e) const { return word_value<scalar_t, kVec>(bias, e); }
};

// One output vector of kVec channels from its kWidth inputs `in` (oldest first).
template <typename scalar_t, int kVec, int kWidth>
__device__ __forceinline__ Pack<scalar_t, kVec> conv_point(const ConvTaps<scalar_t, kVec, kWidth>& taps,
                                                           const Words<scalar_t, kVec>* in, bool silu) {
  Pack<scalar_t, kVec> y;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    float acc = taps.b(e);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) acc += taps.w(j, e) * word_value<scalar_t, kVec>(in[j], e);
    float r = to_float(from_float<scalar_t>(acc));  // rounded before SiLU, as the reference
    if (silu) r = silu_dev(r);
    y.v[e] = from_float<scalar_t>(r);
  }
  return y;
}

// The kHist = kWidth - 1 inputs before token t of sequence b (channels c0 ..): earlier tokens
// of b, else b's initial conv state, else zeros.
template <typename scalar_t, int kVec, int kHist>
__device__ __forceinline__ void load_history(Words<scalar_t, kVec>* win, const scalar_t* __restrict__ x,
                                             const scalar_t* states, const int32_t* __restrict__ cu,
                                             const int32_t* __restrict__ slots, const bool* __restrict__ has_init,
                                             const ConvArgs& a, int b, int64_t t, int64_t c0) {
  const int slot = slots[b];
  CUDA_KERNEL_ASSERT(slot < a.num_slots);
  const bool use_state = slot >= 0 && (has_init == nullptr || has_init[b]);
  const int64_t rel = t - cu[b];
#pragma unroll
  for (int j = 0; j < kHist; ++j) {
    const int64_t p = rel - kHist + j;
    if (p >= 0) {
      win[j] = load_words<scalar_t, kVec>(x + (t - kHist + j) * a.x_stride + c0);
    } else {
      Pack<scalar_t, kVec> v;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        v.v[e] = use_state ? states[(static_cast<int64_t>(slot) * a.dim + c0 + e) * kHist + kHist + p]
                           : from_float<scalar_t>(0.f);
      }
      win[j] = to_words<scalar_t, kVec>(v);
    }
  }
}

// Tokens [t, t_end) one at a time with a sliding window, crossing sequence ends (b holds t):
// the path of runs that end a sequence or the input.
template <typename scalar_t, int kVec, int kWidth>
__device__ __forceinline__ void conv_run_tokens(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                                const scalar_t* states, const int32_t* __restrict__ cu,
                                                const int32_t* __restrict__ slots, const bool* __restrict__ has_init,
                                                const ConvArgs& a, const ConvTaps<scalar_t, kVec, kWidth>& taps, int b,
                                                int64_t t, int64_t t_end, int64_t c0) {
  using VecT = Pack<scalar_t, kVec>;
  constexpr int kHist = kWidth - 1;
  Words<scalar_t, kVec> win[kWidth];  // win[0] is the oldest input, win[kHist] the current one
  load_history<scalar_t, kVec, kHist>(win, x, states, cu, slots, has_init, a, b, t, c0);
  int64_t seq_end = cu[b + 1];
#pragma unroll 1
  for (; t < t_end; ++t) {
    if (t >= seq_end) {  // t starts the next non-empty sequence
      do { ++b; } while (cu[b + 1] <= t);
      seq_end = cu[b + 1];
      load_history<scalar_t, kVec, kHist>(win, x, states, cu, slots, has_init, a, b, t, c0);
    }
    win[kHist] = load_words<scalar_t, kVec>(x + t * a.x_stride + c0);
    *reinterpret_cast<VecT*>(out + t * a.dim + c0) = conv_point<scalar_t, kVec, kWidth>(taps, win, a.silu);
#pragma unroll
    for (int j = 0; j < kHist; ++j) win[j] = win[j + 1];
  }
}

// A thread per (run of kRun tokens, kVec channels), for width kWidth. A run inside one
// sequence loads its kRun input rows and the kWidth - 1 rows before it all at once (kRun +
// kWidth - 1 vector loads in flight, issued before the sequence lookup) and computes from
// registers; the window before a sequence start comes from the conv state instead.
// kConvMinBlocks caps the registers so that several CTAs per SM keep loads in flight.
template <typename scalar_t, int kVec, int kWidth>
__global__ void __launch_bounds__(kThreads, kConvMinBlocks)
    conv_fwd_vec_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                        const scalar_t* states, const int32_t* __restrict__ cu,
                        const int32_t* __restrict__ slots, const bool* __restrict__ has_init, ConvArgs a) {
  using VecT = Pack<scalar_t, kVec>;
  constexpr int kHist = kWidth - 1;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kVec;
  if (c0 >= a.dim) return;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRun;
  const bool full_run = t0 + kRun <= a.tokens;
  Words<scalar_t, kVec> buf[kHist + kRun];  // inputs of tokens t0 - kHist .. t0 + kRun - 1
  if (full_run) {
#pragma unroll
    for (int k = 0; k < kRun; ++k) buf[kHist + k] = load_words<scalar_t, kVec>(x + (t0 + k) * a.x_stride + c0);
    if (t0 >= kHist) {
#pragma unroll
      for (int j = 0; j < kHist; ++j) buf[j] = load_words<scalar_t, kVec>(x + (t0 - kHist + j) * a.x_stride + c0);
    }
  }
  const ConvTaps<scalar_t, kVec, kWidth> taps(weight, bias, c0);
  const int b = find_sequence(cu, a.batch, t0);
  if (!full_run || t0 + kRun > cu[b + 1]) {
    const int64_t t_end = full_run ? t0 + kRun : a.tokens;
    conv_run_tokens<scalar_t, kVec, kWidth>(out, x, states, cu, slots, has_init, a, taps, b, t0, t_end, c0);
    return;
  }
  if (t0 - kHist < cu[b]) load_history<scalar_t, kVec, kHist>(buf, x, states, cu, slots, has_init, a, b, t0, c0);
#pragma unroll
  for (int k = 0; k < kRun; ++k) {
    *reinterpret_cast<VecT*>(out + (t0 + k) * a.dim + c0) =
        conv_point<scalar_t, kVec, kWidth>(taps, buf + k, a.silu);
  }
}

// Decode for width kWidth: a thread per (sequence, kVec channels), whose kVec x (kWidth-1)
// conv state is contiguous ([dim, width-1] per slot) and moves as kWidth - 1 vectors.
template <typename scalar_t, int kVec, int kWidth>
__global__ void __launch_bounds__(kThreads)
    conv_update_vec_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                           scalar_t* states, const int32_t* __restrict__ slots, ConvArgs a) {
  using VecT = Pack<scalar_t, kVec>;
  constexpr int kHist = kWidth - 1;
  const int64_t groups = a.dim / kVec;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.batch * groups) return;
  const int b = static_cast<int>(idx / groups);
  const int64_t c0 = (idx % groups) * kVec;
  const int slot = slots[b];
  CUDA_KERNEL_ASSERT(slot < a.num_slots);
  VecT st[kHist];  // flat [kVec][kHist], channel-major as in memory
  VecT* st_mem = slot >= 0 ? reinterpret_cast<VecT*>(states + (static_cast<int64_t>(slot) * a.dim + c0) * kHist)
                           : nullptr;
#pragma unroll
  for (int j = 0; j < kHist; ++j) {
    if (st_mem != nullptr) {
      st[j] = st_mem[j];
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) st[j].v[e] = from_float<scalar_t>(0.f);
    }
  }
  const VecT in = *reinterpret_cast<const VecT*>(x + b * a.x_stride + c0);
  const ConvTaps<scalar_t, kVec, kWidth> taps(weight, bias, c0);
  VecT y;
  scalar_t* flat = reinterpret_cast<scalar_t*>(st);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    float acc = taps.b(e);
#pragma unroll
    for (int j = 0; j < kHist; ++j) acc += taps.w(j, e) * to_float(flat[e * kHist + j]);
    acc += taps.w(kHist, e) * to_float(in.v[e]);
    float r = to_float(from_float<scalar_t>(acc));
    if (a.silu) r = silu_dev(r);
    y.v[e] = from_float<scalar_t>(r);
#pragma unroll
    for (int j = 0; j + 1 < kHist; ++j) flat[e * kHist + j] = flat[e * kHist + j + 1];
    flat[e * kHist + kHist - 1] = in.v[e];
  }
  *reinterpret_cast<VecT*>(out + b * a.dim + c0) = y;
  if (st_mem == nullptr) return;
#pragma unroll
  for (int j = 0; j < kHist; ++j) st_mem[j] = st[j];
}

// 16-byte vectors when the channel count, the row stride and the pointers (the weight's
// and bias's too: their packs load as vectors) allow it.
template <typename scalar_t>
bool vectorizable(const at::Tensor& x, const at::Tensor& out, const at::Tensor& states,
                  const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr int kVec = kPack16<scalar_t>;
  return x.size(1) % kVec == 0 && x.stride(0) % kVec == 0 && is_aligned16(x.data_ptr()) &&
         is_aligned16(out.data_ptr()) && is_aligned16(states.data_ptr()) && is_aligned16(weight.data_ptr()) &&
         (!bias.has_value() || is_aligned16(bias->data_ptr()));
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
  const LinearAttnCall call = check_causal_conv1d_fwd(out, x, weight, bias, conv_states, cu_seqlens,
                                                      state_indices, has_initial_state);
  check_cuda(x, call.op, "x");
  if (call.batch == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ConvArgs a = make_args(x, weight, conv_states, call.batch, silu);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* slots = state_indices.data_ptr<int32_t>();
  const bool* has_init = opt_ptr<bool>(has_initial_state);
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), call.op, [&] {
    auto* states_p = reinterpret_cast<scalar_t*>(conv_states.data_ptr());
    const auto* x_p = reinterpret_cast<const scalar_t*>(x.data_ptr());
    auto* out_p = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* w_p = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    if (a.tokens > 0 && a.width == 4) {
      const auto launch = [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const dim3 grid(ceil_div(a.tokens, kRun), ceil_div(a.dim / kVec, kThreads));
        conv_fwd_vec_kernel<scalar_t, kVec, 4><<<grid, kThreads, 0, stream>>>(
            out_p, x_p, w_p, opt_ptr<scalar_t>(bias), states_p, cu, slots, has_init, a);
      };
      if (vectorizable<scalar_t>(x, out, conv_states, weight, bias)) {
        launch(std::integral_constant<int, kPack16<scalar_t>>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (a.tokens > 0) {
      conv_fwd_kernel<scalar_t><<<ceil_div(a.tokens * a.dim, kThreads), kThreads, 0, stream>>>(
          out_p, x_p, w_p, opt_ptr<scalar_t>(bias), states_p, cu, slots, has_init, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    conv_state_kernel<scalar_t><<<ceil_div(call.batch * a.dim, kThreads), kThreads, 0, stream>>>(
        x_p, states_p, cu, slots, has_init, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void causal_conv1d_update(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                          const at::Tensor& state_indices, bool silu) {
  const LinearAttnCall call =
      check_causal_conv1d_update(out, x, weight, bias, conv_states, state_indices);
  check_cuda(x, call.op, "x");
  if (call.batch == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ConvArgs a = make_args(x, weight, conv_states, call.batch, silu);
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), call.op, [&] {
    auto* out_p = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x_p = reinterpret_cast<const scalar_t*>(x.data_ptr());
    const auto* w_p = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    auto* states_p = reinterpret_cast<scalar_t*>(conv_states.data_ptr());
    const int32_t* slots = state_indices.data_ptr<int32_t>();
    if (a.width == 4) {
      const auto launch = [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        conv_update_vec_kernel<scalar_t, kVec, 4>
            <<<ceil_div(call.batch * (a.dim / kVec), kThreads), kThreads, 0, stream>>>(
                out_p, x_p, w_p, opt_ptr<scalar_t>(bias), states_p, slots, a);
      };
      if (vectorizable<scalar_t>(x, out, conv_states, weight, bias)) {
        launch(std::integral_constant<int, kPack16<scalar_t>>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    } else {
      conv_update_kernel<scalar_t><<<ceil_div(call.batch * a.dim, kThreads), kThreads, 0, stream>>>(
          out_p, x_p, w_p, opt_ptr<scalar_t>(bias), states_p, slots, a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace splitvl::cuda
