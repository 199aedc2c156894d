// CUDA kernel: gated RMSNorm of the Qwen3.5 linear-attention output,
// RMSNorm(x) * weight * silu(z), with transformers' Qwen3_5RMSNormGated casts.
// Rows are short (a head, e.g. 128), so a group of lanes (not a block) owns a row.
// Semantics: ops/reference_linear_attn.py (gated_rms_norm).
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../linear_attn_checks.h"
#include "common.cuh"
#include "ops.cuh"

namespace {
// A type carried as a value into generic lambdas (std::type_identity is C++20; the GPU machine builds C++17).
template <typename T>
struct TypeTag {
  using type = T;
};
}  // namespace

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;  // rows in flight per lane group
constexpr int kNormMinBlocks = 3;  // CTAs per SM (<= 80 registers): 768 threads with loads in flight

__device__ __forceinline__ float silu_dev(float v) { return v / (1.f + expf(-v)); }

template <int kVec, typename T>
__device__ __forceinline__ Words<T, kVec> ld(const T* p, int64_t i) {
  return load_words<T, kVec>(p + i);
}

// Sum over the kLanes lanes of an aligned lane group (all 32 lanes of the warp take part).
template <int kLanes>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, typename weight_t, int kVec>
__device__ __forceinline__ Pack<scalar_t, kVec> gate_pack(const Words<scalar_t, kVec>& xv,
                                                          const Words<scalar_t, kVec>& zv,
                                                          const Words<weight_t, kVec>& wv, float inv) {
  Pack<scalar_t, kVec> o;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float xe = word_value<scalar_t, kVec>(xv, e), ze = word_value<scalar_t, kVec>(zv, e);
    float h = to_float(from_float<scalar_t>(xe * inv)) * word_value<weight_t, kVec>(wv, e);
    if constexpr (!std::is_same_v<weight_t, float>) h = to_float(from_float<weight_t>(h));
    o.v[e] = from_float<scalar_t>(h * silu_dev(ze));
  }
  return o;
}

template <typename T, int kVec>
__device__ __forceinline__ float sum_sq(const Words<T, kVec>& v) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) s += word_value<T, kVec>(v, e) * word_value<T, kVec>(v, e);
  return s;
}

// A group of kLanes lanes per row (16 for a 128-wide head in 16-byte vectors), kVec
// elements per lane and load. Each group owns kRows rows and loads all their first chunks
// (kLanes * kVec elements: the whole row for head-sized rows) of x and z before any
// reduction, so a thread has 2 * kRows vector loads in flight and a row costs one memory
// round trip; the weight chunk loads once for all of them. Longer rows re-read the rest.
template <typename scalar_t, typename weight_t, int kVec, int kLanes>
__global__ void __launch_bounds__(kThreads, kNormMinBlocks)
    gated_rms_norm_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                          const scalar_t* __restrict__ z, const weight_t* __restrict__ weight,
                          int64_t rows, int64_t d, int64_t x_stride, GatedNormZ zl, float eps) {
  using VecT = Pack<scalar_t, kVec>;
  using WordsT = Words<scalar_t, kVec>;
  constexpr int kGroups = kThreads / kLanes;
  constexpr int kStep = kLanes * kVec;
  const int lane = threadIdx.x % kLanes;
  // Row r of this group: consecutive groups take consecutive rows, so a warp's load is contiguous.
  const int64_t first = static_cast<int64_t>(blockIdx.x) * (kGroups * kRows) + threadIdx.x / kLanes;
  const int64_t i0 = static_cast<int64_t>(lane) * kVec;
  const bool lane_on = i0 < d;
  const auto x_row = [&](int64_t row) { return x + row * x_stride; };
  const auto z_row = [&](int64_t row) {
    return z + (row / zl.heads) * zl.group_stride + (row % zl.heads) * zl.head_stride;
  };
  WordsT xc[kRows], zc[kRows];
  float sq[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = first + r * kGroups;
    if (lane_on && row < rows) {
      xc[r] = ld<kVec>(x_row(row), i0);
      zc[r] = ld<kVec>(z_row(row), i0);
    }
  }
  const Words<weight_t, kVec> wc = lane_on ? ld<kVec>(weight, i0) : Words<weight_t, kVec>{};
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = first + r * kGroups;
    sq[r] = lane_on && row < rows ? sum_sq<scalar_t, kVec>(xc[r]) : 0.f;
    if (row < rows) {
      for (int64_t i = i0 + kStep; i < d; i += kStep) sq[r] += sum_sq<scalar_t, kVec>(ld<kVec>(x_row(row), i));
    }
    sq[r] = group_sum<kLanes>(sq[r]);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = first + r * kGroups;
    if (row >= rows) continue;
    const float inv = rsqrtf(sq[r] / static_cast<float>(d) + eps);
    VecT* orow = reinterpret_cast<VecT*>(out + row * d);
    if (lane_on) orow[i0 / kVec] = gate_pack<scalar_t, weight_t, kVec>(xc[r], zc[r], wc, inv);
    for (int64_t i = i0 + kStep; i < d; i += kStep) {
      orow[i / kVec] = gate_pack<scalar_t, weight_t, kVec>(ld<kVec>(x_row(row), i), ld<kVec>(z_row(row), i),
                                                           ld<kVec>(weight, i), inv);
    }
  }
}

// Lanes per row: 16 when d fits 16 vectors (a 128-wide head in 16-byte vectors), else 32.
int lanes_for(int64_t d, int vec) { return d <= 16 * vec ? 16 : 32; }

// The widest vector (<= 16 bytes of x, and of the weight) that d, the row strides and the
// pointers allow; narrower when the wide one would leave most of a 16-lane group idle.
int pick_vec(const at::Tensor& out, const at::Tensor& x, const at::Tensor& z, GatedNormZ zl,
             const at::Tensor& weight) {
  const int64_t d = x.size(1);
  const int64_t max_elem = std::max(x.element_size(), weight.element_size());
  for (int vec = static_cast<int>(16 / max_elem); vec > 1; vec /= 2) {
    const int64_t bytes = vec * x.element_size(), wbytes = vec * weight.element_size();
    const auto aligned = [](const void* p, int64_t n) { return reinterpret_cast<std::uintptr_t>(p) % n == 0; };
    if (d % vec != 0 || x.stride(0) % vec != 0 || zl.group_stride % vec != 0 || zl.head_stride % vec != 0) {
      continue;
    }
    if (!aligned(x.data_ptr(), bytes) || !aligned(z.data_ptr(), bytes) || !aligned(out.data_ptr(), bytes) ||
        !aligned(weight.data_ptr(), wbytes)) {
      continue;
    }
    if (d / vec >= 16 || vec == 2) return vec;
  }
  return 1;
}

}  // namespace

void gated_rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& z,
                    const at::Tensor& weight, double eps) {
  const char* op = "gated_rms_norm";
  const GatedNormZ zl = check_gated_rms_norm_args(out, x, z, weight, op);
  check_cuda(x, op, "x");
  const int64_t rows = x.size(0), d = x.size(1);
  if (rows == 0 || d == 0) return;
  const int vec = pick_vec(out, x, z, zl, weight);
  const int lanes = lanes_for(d, vec);
  const int64_t rows_per_block = static_cast<int64_t>(kThreads / lanes) * kRows;
  SPLITVL_CHECK(rows / rows_per_block < 0x7fffffff, op, ": too many rows");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    auto* out_p = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x_p = reinterpret_cast<const scalar_t*>(x.data_ptr());
    const auto* z_p = reinterpret_cast<const scalar_t*>(z.data_ptr());
    const auto run = [&](auto w_tag, auto vec_tag) {
      using weight_t = typename decltype(w_tag)::type;
      constexpr int kVec = decltype(vec_tag)::value;
      if constexpr (kVec * sizeof(scalar_t) <= 16 && kVec * sizeof(weight_t) <= 16) {
        const auto* w_p = reinterpret_cast<const weight_t*>(weight.data_ptr());
        const auto e = static_cast<float>(eps);
        if (lanes == 16) {
          gated_rms_norm_kernel<scalar_t, weight_t, kVec, 16>
              <<<blocks, kThreads, 0, stream>>>(out_p, x_p, z_p, w_p, rows, d, x.stride(0), zl, e);
        } else {
          gated_rms_norm_kernel<scalar_t, weight_t, kVec, 32>
              <<<blocks, kThreads, 0, stream>>>(out_p, x_p, z_p, w_p, rows, d, x.stride(0), zl, e);
        }
      }
    };
    const auto by_vec = [&](auto w_tag) {
      switch (vec) {
        case 8: run(w_tag, std::integral_constant<int, 8>{}); break;
        case 4: run(w_tag, std::integral_constant<int, 4>{}); break;
        case 2: run(w_tag, std::integral_constant<int, 2>{}); break;
        default: run(w_tag, std::integral_constant<int, 1>{});
      }
    };
    if (weight.scalar_type() == at::kFloat) {
      by_vec(TypeTag<float>{});
    } else {
      by_vec(TypeTag<scalar_t>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace splitvl::cuda
