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
//
// qk_norm_rope_and_cache is the same kernel with reshape_and_cache folded in (one launch
// less per attention layer at decode): the grid's heads run on past q and k to Hkv v heads,
// a k warp also stores its rotated values at the token's slot of key_cache, and a v warp
// copies its head to value_cache; a token with slot < 0 writes neither cache.
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

// The paged caches of qk_norm_rope_and_cache: contiguous [num_blocks, block_size, Hkv, D],
// so slot s of head h starts at (s * Hkv + h) * D.
template <typename T>
struct CacheArgs {
  const T* v;
  int64_t v_s0, v_s1;
  T* key_cache;
  T* value_cache;
  const int64_t* slots;
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

// v head h of token t to its slot of value_cache, one warp (16-byte packs when VEC).
template <typename T, bool VEC>
__device__ __forceinline__ void copy_v_head(const CacheArgs<T>& c, int dim, int hk, int64_t t, int h, int64_t slot,
                                            int lane) {
  const T* src = c.v + t * c.v_s0 + h * c.v_s1;
  T* dst = c.value_cache + (slot * hk + h) * dim;
  if constexpr (VEC) {
    constexpr int N = kPack16<T>;
    using P = Pack<T, N>;
    for (int p = lane; p < dim / N; p += 32) reinterpret_cast<P*>(dst)[p] = reinterpret_cast<const P*>(src)[p];
  } else {
    for (int d = lane; d < dim; d += 32) dst[d] = src[d];
  }
}

// Head h of token t: its values and weights in registers (16-byte packs when VEC), the
// reduction over the warp, the normalized values to the warp's shared row, then each
// value rotated with its partner from that row and written back in place.
// With CACHE, warps past the q and k heads copy v heads, and k heads go to key_cache too.
template <typename T, typename W, bool VEC, bool CACHE>
__global__ void qk_norm_rope_kernel(QKArgs<T, W> a, CacheArgs<T> c) {
  extern __shared__ float smem[];  // cos [rot_half] | sin [rot_half] | one [dim] row per warp
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y * kWarpsPerCta + warp;
  float* cs = smem;
  float* row = smem + 2 * a.rot_half + warp * a.dim;
  pdl_wait();  // positions, q, k, v, the slots and the caches come from earlier kernels (pdl.cuh)
  pdl_launch_dependents();
  stage_cos_sin(cs, a.positions, a.pos_row_stride, a.pos_col_stride, t, a.cache, a.max_pos, a.rot_half, a.sec);
  __syncthreads();
  // no block barrier below
  const int64_t slot = CACHE ? c.slots[t] : -1;
  if (h >= a.hq + a.hk) {
    if (CACHE && h < a.hq + 2 * a.hk && slot >= 0) copy_v_head<T, VEC>(c, a.dim, a.hk, t, h - a.hq - a.hk, slot, lane);
    return;
  }
  const bool is_q = h < a.hq;
  T* x = is_q ? a.q + t * a.q_s0 + h * a.q_s1 : a.k + t * a.k_s0 + (h - a.hq) * a.k_s1;
  // The k head's row in key_cache, or null (a q head, no cache, or a padding token).
  T* kc = CACHE && !is_q && slot >= 0 ? c.key_cache + (slot * a.hk + (h - a.hq)) * a.dim : nullptr;
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
        if (kc != nullptr) reinterpret_cast<P*>(kc)[p] = o;
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
    for (int d = lane; d < a.dim; d += 32) {
      const T o = from_float<T>(rotated(row, d, a.rot_half, a.is_neox, cos, sin));
      x[d] = o;
      if (kc != nullptr) kc[d] = o;
    }
  }
}

// 16-byte packs fit: whole packs per head, pack-aligned rows, and at most kMaxPacks per lane.
// With a cache, v's rows and both caches too (whole packs per head keep the cache rows aligned).
template <typename T, typename W>
bool vectorizable(const QKArgs<T, W>& a, const CacheArgs<T>* c) {
  constexpr int N = kPack16<T>;
  const int64_t strides[] = {a.q_s0, a.q_s1, a.k_s0, a.k_s1, c ? c->v_s0 : 0, c ? c->v_s1 : 0};
  for (int64_t s : strides)
    if (s % N) return false;
  if (c && !(is_aligned16(c->v) && is_aligned16(c->key_cache) && is_aligned16(c->value_cache))) return false;
  const auto aligned = [](const void* p, size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; };
  return a.dim % N == 0 && a.dim / N <= 32 * kMaxPacks && is_aligned16(a.q) && is_aligned16(a.k) &&
         aligned(a.wq, sizeof(Pack<W, N>)) && aligned(a.wk, sizeof(Pack<W, N>));
}

// Both ops' launch: the q/k norm + rotation, and with `cache` the k/v cache writes. The
// caller has checked the arguments.
template <typename T, typename W>
void launch(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& q_weight,
            const at::Tensor& k_weight, double epsilon, const at::Tensor& cos_sin_cache, bool is_neox,
            const Sections& sec, const CacheArgs<T>* cache, cudaStream_t stream) {
  const int rot_half = static_cast<int>(cos_sin_cache.size(1) / 2);
  const int64_t T_ = positions.size(-1);
  const int hq = static_cast<int>(query.size(1)), hk = static_cast<int>(key.size(1));
  const int heads = hq + (cache ? 2 : 1) * hk;
  const int D = static_cast<int>(query.size(2));
  const int warps = std::min(kWarpsPerCta, heads);
  const dim3 grid(static_cast<unsigned>(T_), static_cast<unsigned>((heads + kWarpsPerCta - 1) / kWarpsPerCta));
  const size_t smem = (2 * static_cast<size_t>(rot_half) + static_cast<size_t>(warps) * D) * sizeof(float);
  QKArgs<T, W> a{};
  a.positions = positions.data_ptr<int64_t>();
  a.pos_row_stride = sec.count ? positions.stride(0) : 0;
  a.pos_col_stride = positions.stride(-1);
  a.q = reinterpret_cast<T*>(query.data_ptr());
  a.k = reinterpret_cast<T*>(key.data_ptr());
  a.q_s0 = query.stride(0);
  a.q_s1 = query.stride(1);
  a.k_s0 = key.stride(0);
  a.k_s1 = key.stride(1);
  a.hq = hq;
  a.hk = hk;
  a.dim = D;
  a.wq = reinterpret_cast<const W*>(q_weight.data_ptr());
  a.wk = reinterpret_cast<const W*>(k_weight.data_ptr());
  a.eps = static_cast<float>(epsilon);
  a.cache = cos_sin_cache.data_ptr<float>();
  a.max_pos = cos_sin_cache.size(0);
  a.rot_half = rot_half;
  a.is_neox = is_neox;
  a.sec = sec;
  const CacheArgs<T> c = cache ? *cache : CacheArgs<T>{};
  const bool vec = vectorizable(a, cache);
  if (cache != nullptr && vec) {
    launch_pdl(qk_norm_rope_kernel<T, W, true, true>, grid, warps * 32, smem, stream, a, c);
  } else if (cache != nullptr) {
    launch_pdl(qk_norm_rope_kernel<T, W, false, true>, grid, warps * 32, smem, stream, a, c);
  } else if (vec) {
    launch_pdl(qk_norm_rope_kernel<T, W, true, false>, grid, warps * 32, smem, stream, a, c);
  } else {
    launch_pdl(qk_norm_rope_kernel<T, W, false, false>, grid, warps * 32, smem, stream, a, c);
  }
}

// f(a value of the kernel's weight type): the input's element type T, or fp32.
template <typename T, typename F>
void with_weight_type(const at::Tensor& weight, const at::Tensor& input, F&& f) {
  if (weight.scalar_type() == input.scalar_type()) {
    f(T{});
  } else {
    f(float{});
  }
}

}  // namespace

void qk_norm_rope(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& q_weight,
                  const at::Tensor& k_weight, double epsilon, const at::Tensor& cos_sin_cache, bool is_neox,
                  at::IntArrayRef mrope_section, bool mrope_interleaved) {
  constexpr const char* op = "qk_norm_rope";
  check_cuda(query, op, "query");
  check_qk_norm_rope(positions, query, key, q_weight, k_weight, cos_sin_cache);
  const Sections sec = make_sections(mrope_section, mrope_interleaved, static_cast<int>(cos_sin_cache.size(1) / 2), op);
  check_positions(positions, sec, op);
  if (positions.size(-1) == 0 || query.size(1) + key.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    with_weight_type<scalar_t>(q_weight, query, [&](auto weight_tag) {
      launch<scalar_t, decltype(weight_tag)>(positions, query, key, q_weight, k_weight, epsilon, cos_sin_cache,
                                             is_neox, sec, nullptr, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void qk_norm_rope_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& q_weight, const at::Tensor& k_weight, double epsilon,
                            const at::Tensor& cos_sin_cache, at::Tensor& key_cache, at::Tensor& value_cache,
                            const at::Tensor& slot_mapping, bool is_neox, at::IntArrayRef mrope_section,
                            bool mrope_interleaved) {
  constexpr const char* op = "qk_norm_rope_and_cache";
  check_cuda(query, op, "query");
  check_qk_norm_rope_and_cache(positions, query, key, value, q_weight, k_weight, cos_sin_cache, key_cache,
                               value_cache, slot_mapping);
  const Sections sec = make_sections(mrope_section, mrope_interleaved, static_cast<int>(cos_sin_cache.size(1) / 2), op);
  check_positions(positions, sec, op);
  if (positions.size(-1) == 0 || query.size(1) + key.size(1) == 0) return;
  const at::Tensor slots = slot_mapping.contiguous();
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    const CacheArgs<scalar_t> cache{reinterpret_cast<const scalar_t*>(value.data_ptr()), value.stride(0),
                                    value.stride(1), reinterpret_cast<scalar_t*>(key_cache.data_ptr()),
                                    reinterpret_cast<scalar_t*>(value_cache.data_ptr()), slots.data_ptr<int64_t>()};
    with_weight_type<scalar_t>(q_weight, query, [&](auto weight_tag) {
      launch<scalar_t, decltype(weight_tag)>(positions, query, key, q_weight, k_weight, epsilon, cos_sin_cache,
                                             is_neox, sec, &cache, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
