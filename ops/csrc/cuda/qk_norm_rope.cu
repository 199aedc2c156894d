// qk_norm_rope: the per-head q/k RMSNorm of Qwen3 / Qwen3.5 attention and the rotary
// embedding, in place, in one launch instead of three (ops/reference.py qk_norm_rope).
//
// Grid (token, group of kWarpsPerCta heads): every head has its own warp, so a decode
// step's few tokens still spread over many SMs. A block stages its token's cos/sin row in
// shared memory (as the rotary kernel does); each warp loads its head with the weights in
// 16-byte packs, normalizes it (rms_norm's numbers, rounded to the input dtype) into a
// shared row, and writes each value rotated with its pair partner read from that row
// (rotary_embedding's numbers on the rounded input). Dims past rot_dim are written
// normalized only.
#include <algorithm>
#include <cstdint>

#include "../qk_norm_rope_checks.h"
#include "common.cuh"
#include "norm_common.cuh"
#include "ops.cuh"
#include "pdl.cuh"
#include "rotary_common.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kWarpsPerCta = 4;  // one head per warp; the grid's y covers the heads
constexpr int kMaxPacks = 2;     // 16-byte packs per lane (heads up to 64 packs)

template <typename T, typename W>
struct QKArgs {
  const int64_t* positions;
  int64_t pos_row_stride, pos_col_stride;
  T* q;
  T* k;
  int64_t q_s0, q_s1, k_s0, k_s1;
  int hq, hk, dim;
  const W* wq;
  const W* wk;
  float eps;
  const float* cache;
  int64_t max_pos;
  int rot_half;
  bool is_neox;
  Sections sec;
};

// Value d of a head after the rotation, from the normalized head `row` (rotary_embedding's
// pairs and expressions).
__device__ __forceinline__ float rotated(const float* row, int d, int rot_half, bool is_neox, const float* cos,
                                         const float* sin) {
  if (d >= 2 * rot_half) return row[d];
  if (is_neox) {
    if (d < rot_half) return row[d] * cos[d] - row[d + rot_half] * sin[d];
    const int i = d - rot_half;
    return row[d] * cos[i] + row[i] * sin[i];
  }
  const int i = d >> 1;
  return (d & 1) ? row[d] * cos[i] + row[d - 1] * sin[i] : row[d] * cos[i] - row[d + 1] * sin[i];
}

// Head h of token t: its values and weights in registers (16-byte packs when VEC), the
// reduction over the warp, the normalized values to the warp's shared row, then each
// value rotated with its partner from that row and written back in place.
template <typename T, typename W, bool VEC>
__global__ void qk_norm_rope_kernel(QKArgs<T, W> a) {
  extern __shared__ float smem[];  // cos [rot_half] | sin [rot_half] | one [dim] row per warp
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y * kWarpsPerCta + warp;
  float* cs = smem;
  float* row = smem + 2 * a.rot_half + warp * a.dim;
  pdl_wait();  // positions, q and k come from earlier kernels (pdl.cuh)
  pdl_launch_dependents();
  stage_cos_sin(cs, a.positions, a.pos_row_stride, a.pos_col_stride, t, a.cache, a.max_pos, a.rot_half, a.sec);
  __syncthreads();
  if (h >= a.hq + a.hk) return;  // no block barrier below
  const bool is_q = h < a.hq;
  T* x = is_q ? a.q + t * a.q_s0 + h * a.q_s1 : a.k + t * a.k_s0 + (h - a.hq) * a.k_s1;
  const W* w = is_q ? a.wq : a.wk;
  const float* cos = cs;
  const float* sin = cs + a.rot_half;
  if constexpr (VEC) {
    // The same packs per lane, in the same order, as rms_norm's warp path: the same sum.
    constexpr int N = kPack16<T>;
    using P = Pack<T, N>;
    using PW = Pack<W, N>;
    const int packs = a.dim / N;
    P xp[kMaxPacks];
    PW wp[kMaxPacks];
#pragma unroll
    for (int k = 0; k < kMaxPacks; ++k) {
      const int p = lane + 32 * k;
      if (p < packs) {
        xp[k] = reinterpret_cast<const P*>(x)[p];
        wp[k] = reinterpret_cast<const PW*>(w)[p];
      }
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxPacks; ++k) {
      if (lane + 32 * k < packs) {
#pragma unroll
        for (int j = 0; j < N; ++j) ss += to_float(xp[k].v[j]) * to_float(xp[k].v[j]);
      }
    }
    const float inv = rsqrtf(warp_sum(ss) / a.dim + a.eps);
#pragma unroll
    for (int k = 0; k < kMaxPacks; ++k) {
      const int p = lane + 32 * k;
      if (p < packs) {
#pragma unroll
        for (int j = 0; j < N; ++j) row[p * N + j] = to_float(scale_weight<T, W>(to_float(xp[k].v[j]), inv, wp[k].v[j]));
      }
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kMaxPacks; ++k) {
      const int p = lane + 32 * k;
      if (p < packs) {
        P o;
#pragma unroll
        for (int j = 0; j < N; ++j) o.v[j] = from_float<T>(rotated(row, p * N + j, a.rot_half, a.is_neox, cos, sin));
        reinterpret_cast<P*>(x)[p] = o;
      }
    }
  } else {
    float ss = 0.f;
    for (int d = lane; d < a.dim; d += 32) {
      const float v = to_float(x[d]);
      row[d] = v;
      ss += v * v;
    }
    const float inv = rsqrtf(warp_sum(ss) / a.dim + a.eps);
    for (int d = lane; d < a.dim; d += 32) row[d] = to_float(scale_weight<T, W>(row[d], inv, w[d]));
    __syncwarp();
    for (int d = lane; d < a.dim; d += 32) x[d] = from_float<T>(rotated(row, d, a.rot_half, a.is_neox, cos, sin));
  }
}

// 16-byte packs fit: whole packs per head, pack-aligned rows, and at most kMaxPacks per lane.
template <typename T, typename W>
bool vectorizable(const QKArgs<T, W>& a) {
  constexpr int N = kPack16<T>;
  const int64_t strides[] = {a.q_s0, a.q_s1, a.k_s0, a.k_s1};
  for (int64_t s : strides)
    if (s % N) return false;
  const auto aligned = [](const void* p, size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; };
  return a.dim % N == 0 && a.dim / N <= 32 * kMaxPacks && is_aligned16(a.q) && is_aligned16(a.k) &&
         aligned(a.wq, sizeof(Pack<W, N>)) && aligned(a.wk, sizeof(Pack<W, N>));
}

}  // namespace

void qk_norm_rope(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& q_weight,
                  const at::Tensor& k_weight, double epsilon, const at::Tensor& cos_sin_cache, bool is_neox,
                  at::IntArrayRef mrope_section, bool mrope_interleaved) {
  constexpr const char* op = "qk_norm_rope";
  check_cuda(query, op, "query");
  check_qk_norm_rope(positions, query, key, q_weight, k_weight, cos_sin_cache);
  const int rot_half = static_cast<int>(cos_sin_cache.size(1) / 2);
  const Sections sec = make_sections(mrope_section, mrope_interleaved, rot_half, op);
  check_positions(positions, sec, op);
  const int64_t T = positions.size(-1);
  const int heads = static_cast<int>(query.size(1) + key.size(1));
  if (T == 0 || heads == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int D = static_cast<int>(query.size(2));
  const int warps = std::min(kWarpsPerCta, heads);
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((heads + kWarpsPerCta - 1) / kWarpsPerCta));
  const size_t smem = (2 * static_cast<size_t>(rot_half) + static_cast<size_t>(warps) * D) * sizeof(float);
  SPLITVL_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    auto launch = [&](auto weight_tag) {
      using W = decltype(weight_tag);
      QKArgs<scalar_t, W> a{};
      a.positions = positions.data_ptr<int64_t>();
      a.pos_row_stride = sec.count ? positions.stride(0) : 0;
      a.pos_col_stride = positions.stride(-1);
      a.q = reinterpret_cast<scalar_t*>(query.data_ptr());
      a.k = reinterpret_cast<scalar_t*>(key.data_ptr());
      a.q_s0 = query.stride(0);
      a.q_s1 = query.stride(1);
      a.k_s0 = key.stride(0);
      a.k_s1 = key.stride(1);
      a.hq = static_cast<int>(query.size(1));
      a.hk = static_cast<int>(key.size(1));
      a.dim = D;
      a.wq = reinterpret_cast<const W*>(q_weight.data_ptr());
      a.wk = reinterpret_cast<const W*>(k_weight.data_ptr());
      a.eps = static_cast<float>(epsilon);
      a.cache = cos_sin_cache.data_ptr<float>();
      a.max_pos = cos_sin_cache.size(0);
      a.rot_half = rot_half;
      a.is_neox = is_neox;
      a.sec = sec;
      if (vectorizable(a)) {
        launch_pdl(qk_norm_rope_kernel<scalar_t, W, true>, grid, warps * 32, smem, stream, a);
      } else {
        launch_pdl(qk_norm_rope_kernel<scalar_t, W, false>, grid, warps * 32, smem, stream, a);
      }
    };
    if (q_weight.scalar_type() == query.scalar_type()) {
      launch(scalar_t{});
    } else {
      launch(float{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
