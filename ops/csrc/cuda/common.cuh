// Shared device helpers of the splitvl CUDA kernels: dtype dispatch, scalar
// conversions, 16-byte packs and warp/block reductions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../check.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace splitvl {

// Dispatch an at::ScalarType to the native CUDA element type `scalar_t`.
#define SPLITVL_DISPATCH_FLOAT(TYPE, NAME, ...)                                  \
  [&] {                                                                         \
    switch (TYPE) {                                                             \
      case at::ScalarType::Float: {                                             \
        using scalar_t = float;                                                 \
        return __VA_ARGS__();                                                   \
      }                                                                         \
      case at::ScalarType::Half: {                                              \
        using scalar_t = __half;                                                \
        return __VA_ARGS__();                                                   \
      }                                                                         \
      case at::ScalarType::BFloat16: {                                          \
        using scalar_t = __nv_bfloat16;                                         \
        return __VA_ARGS__();                                                   \
      }                                                                         \
      default:                                                                  \
        SPLITVL_CHECK(false, NAME, ": unsupported dtype ", TYPE,                  \
                    " (expected float32, float16 or bfloat16)");                \
    }                                                                           \
  }()

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  SPLITVL_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op) {
  SPLITVL_CHECK(a.device() == b.device(), op, ": tensors on different devices (", a.device(),
              " vs ", b.device(), ")");
}

// The preamble of an op's checks: `first` (named `name`) is a CUDA tensor and every
// one of `others` lives on its device.
template <typename... Others>
inline void check_cuda_tensors(const char* op, const char* name, const at::Tensor& first,
                               const Others&... others) {
  check_cuda(first, op, name);
  (check_same_device(first, others, op), ...);
}

inline bool is_aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements of T moved as one aligned load/store (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
constexpr int kPack16 = 16 / sizeof(T);

// kVec values of T as loaded into registers: in 32-bit words (16-bit values two to a
// register) when they fill whole words. A Pack of 16-bit structs takes a register per
// value, which spills kernels that keep many vectors in flight.
template <typename T, int kVec>
using Words = std::conditional_t<(kVec * sizeof(T)) % 4 == 0, Pack<uint32_t, (kVec * sizeof(T) + 3) / 4>,
                                 Pack<T, kVec>>;

template <typename T, int kVec>
__device__ __forceinline__ Words<T, kVec> load_words(const T* p) {
  return *reinterpret_cast<const Words<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ Words<T, kVec> to_words(const Pack<T, kVec>& v) {
  Words<T, kVec> r;
  static_assert(sizeof(r) == sizeof(v), "words hold the values' bytes");
  memcpy(&r, &v, sizeof(r));
  return r;
}

// Value e of kVec values held as Words, widened to float.
template <typename T, int kVec>
__device__ __forceinline__ float word_value(const Words<T, kVec>& r, int e) {
  if constexpr (std::is_same_v<Words<T, kVec>, Pack<T, kVec>>) {
    return to_float(r.v[e]);
  } else if constexpr (sizeof(T) == 4) {
    return __uint_as_float(r.v[e]);
  } else {
    const uint32_t word = r.v[e / 2];
    const auto bits = static_cast<unsigned short>(e % 2 != 0 ? word >> 16 : word & 0xffffu);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
    else return __half2float(__ushort_as_half(bits));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace splitvl
