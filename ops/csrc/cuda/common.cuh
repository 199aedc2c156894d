// Shared device helpers of the splitvl CUDA kernels: dtype dispatch, scalar
// conversions, 16-byte packs and warp/block reductions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <type_traits>

namespace splitvl {

namespace detail {

// Error messages are formatted here with snprintf and handed to TORCH_CHECK as
// one C string, so no std::ostringstream (c10::str) code is instantiated in
// these objects. On the GPU machine (torch 2.11, nvcc -ccbin /opt/gcc) any
// extension's TORCH_CHECK with stream-built arguments segfaulted when it fired
// (a two-line probe extension too), while C-string messages raise normally.
struct MsgBuf {
  char text[768];
  size_t len = 0;
};

inline void put_fmt(MsgBuf& m, const char* fmt, ...) {
  if (m.len + 1 >= sizeof(m.text)) return;
  va_list args;
  va_start(args, fmt);
  const int n = std::vsnprintf(m.text + m.len, sizeof(m.text) - m.len, fmt, args);
  va_end(args);
  if (n > 0) m.len = std::min(sizeof(m.text) - 1, m.len + static_cast<size_t>(n));
}

inline void put(MsgBuf& m, const char* s) { put_fmt(m, "%s", s); }
inline void put(MsgBuf& m, double v) { put_fmt(m, "%g", v); }
inline void put(MsgBuf& m, c10::ScalarType t) { put(m, c10::toString(t)); }
inline void put(MsgBuf& m, c10::IntArrayRef a) {
  put(m, "[");
  for (size_t i = 0; i < a.size(); ++i) put_fmt(m, i ? ", %lld" : "%lld", static_cast<long long>(a[i]));
  put(m, "]");
}
inline void put(MsgBuf& m, const c10::Device& d) {
  put(m, d.is_cuda() ? "cuda" : d.is_cpu() ? "cpu" : "other");
  if (d.has_index()) put_fmt(m, ":%d", static_cast<int>(d.index()));
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void put(MsgBuf& m, T v) {
  put_fmt(m, "%lld", static_cast<long long>(v));
}

template <typename... Args>
const char* format(MsgBuf& m, const Args&... args) {
  m.text[0] = '\0';
  (put(m, args), ...);
  return m.text;
}

}  // namespace detail

// TORCH_CHECK with a snprintf-built message (see detail::MsgBuf for why).
#define SPLITVL_CHECK(cond, ...)                                                   \
  do {                                                                             \
    if (C10_UNLIKELY(!(cond))) {                                                   \
      ::splitvl::detail::MsgBuf splitvl_msg_;                                      \
      const char* splitvl_text_ = ::splitvl::detail::format(splitvl_msg_, __VA_ARGS__); \
      TORCH_CHECK(false, splitvl_text_);                                           \
    }                                                                              \
  } while (0)

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
