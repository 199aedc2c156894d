// CUDA kernel: gated RMSNorm of the Qwen3.5 linear-attention output,
// RMSNorm(x) * weight * silu(z), with transformers' Qwen3_5RMSNormGated casts.
// Rows are short (a head, e.g. 128), so a warp (not a block) owns a row.
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
constexpr int kRowsPerBlock = kThreads / 32;

__device__ __forceinline__ float silu_dev(float v) { return v / (1.f + expf(-v)); }

// A warp per row, kVec elements per lane and load. The first kCache chunks of the row
// (all of it for head-sized rows) load x, z and the weight together and stay in
// registers, so a row costs one memory round trip; longer rows re-read the rest.
constexpr int kCache = 2;

template <int kVec, typename T>
__device__ __forceinline__ Pack<T, kVec> ld(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p + i);
}

template <typename scalar_t, typename weight_t, int kVec>
__device__ __forceinline__ Pack<scalar_t, kVec> gate_pack(const Pack<scalar_t, kVec>& xv,
                                                          const Pack<scalar_t, kVec>& zv,
                                                          const Pack<weight_t, kVec>& wv, float inv) {
  Pack<scalar_t, kVec> o;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    float h = to_float(from_float<scalar_t>(to_float(xv.v[e]) * inv)) * to_float(wv.v[e]);
    if constexpr (!std::is_same_v<weight_t, float>) h = to_float(from_float<weight_t>(h));
    o.v[e] = from_float<scalar_t>(h * silu_dev(to_float(zv.v[e])));
  }
  return o;
}

template <typename scalar_t, typename weight_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    gated_rms_norm_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                          const scalar_t* __restrict__ z, const weight_t* __restrict__ weight,
                          int64_t rows, int64_t d, int64_t x_stride, GatedNormZ zl, float eps) {
  using VecT = Pack<scalar_t, kVec>;
  using VecW = Pack<weight_t, kVec>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const scalar_t* xr = x + row * x_stride;
  const scalar_t* zr = z + (row / zl.heads) * zl.group_stride + (row % zl.heads) * zl.head_stride;
  VecT xc[kCache], zc[kCache];
  VecW wc[kCache];
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int64_t i = (lane + 32 * k) * kVec;
    if (i < d) {
      xc[k] = ld<kVec>(xr, i);
      zc[k] = ld<kVec>(zr, i);
      wc[k] = ld<kVec>(weight, i);
#pragma unroll
      for (int e = 0; e < kVec; ++e) sq += to_float(xc[k].v[e]) * to_float(xc[k].v[e]);
    }
  }
  for (int64_t i = (lane + 32 * kCache) * kVec; i < d; i += 32 * kVec) {
    const VecT xv = ld<kVec>(xr, i);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sq += to_float(xv.v[e]) * to_float(xv.v[e]);
  }
  const float inv = rsqrtf(warp_sum(sq) / static_cast<float>(d) + eps);
  VecT* orow = reinterpret_cast<VecT*>(out + row * d);
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int64_t i = (lane + 32 * k) * kVec;
    if (i < d) orow[i / kVec] = gate_pack<scalar_t, weight_t, kVec>(xc[k], zc[k], wc[k], inv);
  }
  for (int64_t i = (lane + 32 * kCache) * kVec; i < d; i += 32 * kVec)
    orow[i / kVec] =
        gate_pack<scalar_t, weight_t, kVec>(ld<kVec>(xr, i), ld<kVec>(zr, i), ld<kVec>(weight, i), inv);
}

// The widest vector (<= 16 bytes of x, and of the weight) that d, the row strides and the
// pointers allow; narrower when the wide one would leave lanes of the warp idle.
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
    if (d / vec >= 32 || vec == 2) return vec;
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
  SPLITVL_CHECK(rows / kRowsPerBlock < 0x7fffffff, op, ": too many rows");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int vec = pick_vec(out, x, z, zl, weight);
  const auto blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    auto* out_p = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x_p = reinterpret_cast<const scalar_t*>(x.data_ptr());
    const auto* z_p = reinterpret_cast<const scalar_t*>(z.data_ptr());
    const auto run = [&](auto w_tag, auto vec_tag) {
      using weight_t = typename decltype(w_tag)::type;
      constexpr int kVec = decltype(vec_tag)::value;
      if constexpr (kVec * sizeof(scalar_t) <= 16 && kVec * sizeof(weight_t) <= 16) {
        gated_rms_norm_kernel<scalar_t, weight_t, kVec><<<blocks, kThreads, 0, stream>>>(
            out_p, x_p, z_p, reinterpret_cast<const weight_t*>(weight.data_ptr()), rows, d, x.stride(0), zl,
            static_cast<float>(eps));
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
