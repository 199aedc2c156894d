// CUDA kernel: one Gated DeltaNet decode step between the projections, in one launch:
// gating, causal conv update + SiLU, l2-normalized q/k, the gated delta rule step on the
// fp32 state and the gated RMSNorm (four launches per layer and step otherwise).
//
// One CTA per (sequence, key head) does every value head of that key head. The conv
// state rows of its q, k and v channels are then read and written by this CTA alone
// (the q/k channels serve all its value heads), and each value head's output row, which
// the norm reduces over, stays in the CTA. Warp w holds state rows w, w + 8, ... of a
// tile of 32 * kVec columns in registers: the state is read once and written once, a
// warp moving whole 512-byte rows with 16-byte accesses.
// Semantics: ops/reference_linear_attn.py (gated_delta_net_decode); the roundings are
// those of the gdn_gating, causal_conv1d_update, gated_delta_rule_recurrent and
// gated_rms_norm kernels.
#include <c10/cuda/CUDAException.h>

#include <type_traits>

#include "../linear_attn_checks.h"
#include "common.cuh"
#include "ops.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxCols = 32 * 4;  // columns of a tile at the widest vector
constexpr int kMaxHeadDim = kWarps * 32;
constexpr float kL2Eps = 1e-6f;
constexpr float kSoftplusThreshold = 20.f;  // torch's softplus default: linear above it

struct GdnArgs {
  int64_t proj_stride;
  int hv, dk, dv, group, conv_dim, key_dim, width, num_slots;
  float scale, eps;
  bool l2norm, norm_fp32;
};

// Starts moving the CTA's recurrent state slices towards L2 while the conv phase runs (at small
// batches the step is latency-bound: the conv and the state reads would otherwise be serial).
__device__ __forceinline__ void prefetch_state(const float* base, int64_t floats) {
  const char* bytes = reinterpret_cast<const char*>(base);
  const int64_t lines = (floats * static_cast<int64_t>(sizeof(float)) + 127) / 128;
  for (int64_t l = threadIdx.x; l < lines; l += kThreads) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(bytes + l * 128));
  }
}

// Output of conv channel c for sequence row `row`; shifts the channel's conv state (null: no slot).
template <typename scalar_t>
__device__ __forceinline__ float conv_channel(const scalar_t* row, const scalar_t* __restrict__ weight,
                                              scalar_t* state, int64_t c, int width) {
  const int hist = width - 1;
  const scalar_t* w = weight + c * width;
  scalar_t* st = state != nullptr ? state + c * hist : nullptr;
  const scalar_t xv = row[c];
  float acc = 0.f;
  for (int j = 0; j < hist; ++j) acc += to_float(w[j]) * (st != nullptr ? to_float(st[j]) : 0.f);
  acc += to_float(w[hist]) * to_float(xv);
  float y = to_float(from_float<scalar_t>(acc));  // rounded before SiLU, as the conv kernels
  y = y / (1.f + __expf(-y));
  if (st != nullptr) {
    for (int j = 0; j + 1 < hist; ++j) st[j] = st[j + 1];
    st[hist - 1] = xv;
  }
  return to_float(from_float<scalar_t>(y));
}

// Phase 1: conv outputs of the CTA's channels into xs ([q | k | v of its value heads], fp32 of
// the rounded values) and g, beta of its value heads into gb ([g | beta]).
template <typename scalar_t>
__device__ void conv_and_gating(float* xs, float* gb, const scalar_t* row, const scalar_t* __restrict__ weight,
                                scalar_t* conv_slot, const float* __restrict__ a_log,
                                const float* __restrict__ dt_bias, int hq, const GdnArgs& a) {
  const int channels = 2 * a.dk + a.group * a.dv;
  for (int i = threadIdx.x; i < channels; i += kThreads) {
    int64_t c;
    if (i < a.dk) c = static_cast<int64_t>(hq) * a.dk + i;
    else if (i < 2 * a.dk) c = a.key_dim + static_cast<int64_t>(hq) * a.dk + (i - a.dk);
    else c = 2 * static_cast<int64_t>(a.key_dim) + static_cast<int64_t>(hq) * a.group * a.dv + (i - 2 * a.dk);
    xs[i] = conv_channel(row, weight, conv_slot, c, a.width);
  }
  const scalar_t* ba = row + a.conv_dim + static_cast<int64_t>(a.hv) * a.dv;
  for (int i = threadIdx.x; i < a.group; i += kThreads) {
    const int h = hq * a.group + i;
    // As gdn_gating: beta is the fp32 sigmoid rounded to the dtype; g stays fp32.
    gb[a.group + i] = to_float(from_float<scalar_t>(1.f / (1.f + expf(-to_float(ba[h])))));
    const float x = to_float(ba[a.hv + h]) + dt_bias[h];
    const float softplus = x > kSoftplusThreshold ? x : log1pf(expf(x));
    gb[i] = -expf(a_log[h]) * softplus;
  }
}

// Phase 2: q <- q / |q| * scale, k <- k / |k| (without l2norm: q * scale).
__device__ void normalize_qk(float* xs, float* scratch, const GdnArgs& a) {
  float sq = 0.f, sk = 0.f;
  for (int i = threadIdx.x; i < a.dk; i += kThreads) {
    sq += xs[i] * xs[i];
    sk += xs[a.dk + i] * xs[a.dk + i];
  }
  float q_inv = 1.f, k_inv = 1.f;
  if (a.l2norm) {
    q_inv = rsqrtf(block_sum(sq, scratch) + kL2Eps);
    k_inv = rsqrtf(block_sum(sk, scratch) + kL2Eps);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < a.dk; i += kThreads) {
    xs[i] = xs[i] * q_inv * a.scale;
    xs[a.dk + i] *= k_inv;
  }
  __syncthreads();
}

// Phase 3, one tile of columns [c_base, c_base + 32 kVec) of value head `h`: the recurrent step
// on the state in registers; writes the output columns (rounded to scalar_t) to obuf.
template <typename scalar_t, int kVec, int kRows>
__device__ void delta_tile(float* slot_state, const float* xs, const float* vs, float decay, float bt,
                           float* red, float* obuf, int c_base, const GdnArgs& a) {
  constexpr int kCols = 32 * kVec;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = c_base + lane * kVec;
  const bool valid = c0 < a.dv;  // kVec > 1 only when dv % kVec == 0
  const float *qs = xs, *ks = xs + a.dk;
  float s[kRows][kVec], part[kVec];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = warp + r * kWarps;
    const bool load = valid && i < a.dk && slot_state != nullptr;
    const float* src = slot_state + static_cast<int64_t>(i) * a.dv + c0;
    if constexpr (kVec == 4) {
      const float4 v4 = load ? *reinterpret_cast<const float4*>(src) : make_float4(0.f, 0.f, 0.f, 0.f);
      s[r][0] = v4.x; s[r][1] = v4.y; s[r][2] = v4.z; s[r][3] = v4.w;
    } else {
      s[r][0] = load ? *src : 0.f;
    }
  }
  // kv_mem = (decay S)^T k
#pragma unroll
  for (int e = 0; e < kVec; ++e) part[e] = 0.f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = warp + r * kWarps;
    const float ki = i < a.dk ? ks[i] : 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      s[r][e] *= decay;
      part[e] += s[r][e] * ki;
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) red[warp * kCols + lane * kVec + e] = part[e];
  __syncthreads();
  float delta[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    float kv = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) kv += red[w * kCols + lane * kVec + e];
    delta[e] = valid ? (vs[c0 + e] - kv) * bt : 0.f;
    part[e] = 0.f;
  }
  __syncthreads();  // red is reused below
  // S += k delta^T; o = S^T q
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = warp + r * kWarps;
    const float ki = i < a.dk ? ks[i] : 0.f, qi = i < a.dk ? qs[i] : 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      s[r][e] += ki * delta[e];
      part[e] += s[r][e] * qi;
    }
    if (valid && i < a.dk && slot_state != nullptr) {
      float* dst = slot_state + static_cast<int64_t>(i) * a.dv + c0;
      if constexpr (kVec == 4) {
        *reinterpret_cast<float4*>(dst) = make_float4(s[r][0], s[r][1], s[r][2], s[r][3]);
      } else {
        *dst = s[r][0];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) red[warp * kCols + lane * kVec + e] = part[e];
  __syncthreads();
  if (warp == 0 && valid) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += red[w * kCols + lane * kVec + e];
      obuf[c0 + e] = to_float(from_float<scalar_t>(o));
    }
  }
  __syncthreads();  // obuf complete; red free for the next tile
}

// Phase 4: out[b, h] = RMSNorm(obuf) * weight * silu(z) with gated_rms_norm's roundings.
template <typename scalar_t>
__device__ void gated_norm_row(scalar_t* out_row, const float* obuf, const scalar_t* z,
                               const void* norm_weight, float* scratch, const GdnArgs& a) {
  float sq = 0.f;
  for (int c = threadIdx.x; c < a.dv; c += kThreads) sq += obuf[c] * obuf[c];
  const float inv = rsqrtf(block_sum(sq, scratch) / static_cast<float>(a.dv) + a.eps);
  for (int c = threadIdx.x; c < a.dv; c += kThreads) {
    float hval = to_float(from_float<scalar_t>(obuf[c] * inv));
    if (a.norm_fp32) {
      hval *= static_cast<const float*>(norm_weight)[c];
    } else {
      hval = to_float(from_float<scalar_t>(hval * to_float(static_cast<const scalar_t*>(norm_weight)[c])));
    }
    const float zf = to_float(z[c]);
    out_row[c] = from_float<scalar_t>(hval * (zf / (1.f + expf(-zf))));
  }
  __syncthreads();  // obuf is overwritten by the next value head
}

template <typename scalar_t, int kVec, int kRows>
__global__ void __launch_bounds__(kThreads)
    gdn_decode_kernel(scalar_t* __restrict__ out, const scalar_t* proj,
                      const scalar_t* __restrict__ conv_weight, scalar_t* __restrict__ conv_states,
                      const float* __restrict__ a_log, const float* __restrict__ dt_bias,
                      float* __restrict__ rec_states, const int32_t* slots,
                      const void* __restrict__ norm_weight, GdnArgs a) {
  extern __shared__ float smem[];
  __shared__ float scratch[32];
  float* xs = smem;                                // [2 dk + group dv]
  float* red = xs + 2 * a.dk + a.group * a.dv;     // [kWarps][kMaxCols]
  float* obuf = red + kWarps * kMaxCols;           // [dv]
  float* gb = obuf + a.dv;                         // [2 group]
  const int b = blockIdx.x, hq = blockIdx.y;
  pdl_wait();  // the projection, slots and states come from earlier kernels (pdl.cuh)
  pdl_launch_dependents();
  const int slot = slots[b];
  CUDA_KERNEL_ASSERT(slot < a.num_slots);
  const scalar_t* row = proj + b * a.proj_stride;
  scalar_t* conv_slot = slot >= 0 ? conv_states + static_cast<int64_t>(slot) * a.conv_dim * (a.width - 1) : nullptr;
  if (slot >= 0) {
    prefetch_state(rec_states + (static_cast<int64_t>(slot) * a.hv + static_cast<int64_t>(hq) * a.group) * a.dk * a.dv,
                   static_cast<int64_t>(a.group) * a.dk * a.dv);
  }
  conv_and_gating(xs, gb, row, conv_weight, conv_slot, a_log, dt_bias, hq, a);
  __syncthreads();
  normalize_qk(xs, scratch, a);
  for (int hl = 0; hl < a.group; ++hl) {
    const int h = hq * a.group + hl;
    float* slot_state =
        slot >= 0 ? rec_states + (static_cast<int64_t>(slot) * a.hv + h) * a.dk * a.dv : nullptr;
    const float decay = expf(gb[hl]), bt = gb[a.group + hl];
    for (int c_base = 0; c_base < a.dv; c_base += 32 * kVec) {
      delta_tile<scalar_t, kVec, kRows>(slot_state, xs, xs + 2 * a.dk + hl * a.dv, decay, bt, red, obuf,
                                        c_base, a);
    }
    gated_norm_row(out + (static_cast<int64_t>(b) * a.hv + h) * a.dv, obuf,
                   row + a.conv_dim + static_cast<int64_t>(h) * a.dv, norm_weight, scratch, a);
  }
}

}  // namespace

void gated_delta_net_decode(at::Tensor& out, const at::Tensor& proj, const at::Tensor& conv_weight,
                            at::Tensor& conv_states, const at::Tensor& A_log,
                            const at::Tensor& dt_bias, at::Tensor& recurrent_states,
                            const at::Tensor& state_indices, const at::Tensor& norm_weight,
                            double eps, bool use_qk_l2norm) {
  constexpr const char* op = "gated_delta_net_decode";
  const GdnDecodeDims d = check_gated_delta_net_decode(out, proj, conv_weight, conv_states, A_log,
                                                       dt_bias, recurrent_states, state_indices,
                                                       norm_weight);
  check_cuda(proj, op, "proj");
  SPLITVL_CHECK(d.dk <= kMaxHeadDim, op, ": key head dim ", d.dk, " > ", kMaxHeadDim, " is not supported");
  SPLITVL_CHECK(d.hk <= 65535, op, ": too many key heads");
  if (d.batch == 0) return;
  const int group = static_cast<int>(d.hv / d.hk);
  const size_t smem = sizeof(float) * (2 * d.dk + group * d.dv + kWarps * kMaxCols + d.dv + 2 * group);
  SPLITVL_CHECK(smem <= 48 * 1024, op, ": ", group, " value heads of dim ", d.dv, " per key head need ", smem,
                " bytes of shared memory (at most 48 KiB)");
  const c10::cuda::CUDAGuard guard(proj.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const GdnArgs a{proj.stride(0), static_cast<int>(d.hv), static_cast<int>(d.dk), static_cast<int>(d.dv), group,
                  static_cast<int>(d.conv_dim), static_cast<int>(d.key_dim), static_cast<int>(d.width),
                  static_cast<int>(recurrent_states.size(0)), 1.f / sqrtf(static_cast<float>(d.dk)),
                  static_cast<float>(eps), use_qk_l2norm, norm_weight.scalar_type() == at::kFloat};
  const bool vec4 = d.dv % 4 == 0 && is_aligned16(recurrent_states.data_ptr());
  const dim3 grid(static_cast<unsigned>(d.batch), static_cast<unsigned>(d.hk));
  SPLITVL_DISPATCH_FLOAT(proj.scalar_type(), op, [&] {
    const auto launch = [&](auto vec, auto rows) {
      launch_pdl(gdn_decode_kernel<scalar_t, decltype(vec)::value, decltype(rows)::value>, grid, kThreads, smem, stream,
          reinterpret_cast<scalar_t*>(out.data_ptr()), reinterpret_cast<const scalar_t*>(proj.data_ptr()),
          reinterpret_cast<const scalar_t*>(conv_weight.data_ptr()),
          reinterpret_cast<scalar_t*>(conv_states.data_ptr()), A_log.data_ptr<float>(), dt_bias.data_ptr<float>(),
          recurrent_states.data_ptr<float>(), state_indices.data_ptr<int32_t>(), norm_weight.data_ptr(), a);
    };
    const auto by_rows = [&](auto vec) {
      if (d.dk <= 4 * kWarps) launch(vec, std::integral_constant<int, 4>{});
      else if (d.dk <= 16 * kWarps) launch(vec, std::integral_constant<int, 16>{});
      else launch(vec, std::integral_constant<int, 32>{});
    };
    if (vec4) by_rows(std::integral_constant<int, 4>{});
    else by_rows(std::integral_constant<int, 1>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace splitvl::cuda
