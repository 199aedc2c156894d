// rms_norm and fused_add_rms_norm (Qwen3 RMSNorm math, see ops/reference.py).
//
// One warp per row for short rows (q/k norm over head_dim), one block per row
// otherwise. Each thread keeps its 16-byte packs in registers between the
// reduction and the write, so the input is read once.
#include "common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kCache = 4;         // packs a thread keeps in registers
constexpr int kWarpRowPacks = 128;  // rows up to this many packs use a warp each

struct RowLayout {
  int64_t rows, heads;     // row r -> (r / heads, r % heads)
  int64_t s0, s1;          // element strides of those two indices
  int dim;
};

__device__ __forceinline__ int64_t row_offset(const RowLayout& L, int64_t r) {
  return (r / L.heads) * L.s0 + (r % L.heads) * L.s1;
}

// Round x*inv to T first, then multiply by the weight (transformers' order).
template <typename T>
__device__ __forceinline__ T scale_weight(float x, float inv, T w) {
  return from_float<T>(to_float(from_float<T>(x * inv)) * to_float(w));
}

template <typename T, int VEC, bool WARP>
__device__ __forceinline__ void row_bounds(int64_t& row, int& tid, int& nthr, int64_t rows) {
  if (WARP) {
    row = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    tid = threadIdx.x & 31;
    nthr = 32;
  } else {
    row = blockIdx.x;
    tid = threadIdx.x;
    nthr = blockDim.x;
  }
}

template <typename T, int VEC, bool WARP>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ in,
                                const T* __restrict__ weight, RowLayout L, float eps) {
  __shared__ float scratch[32];
  using P = Pack<T, VEC>;
  int64_t row;
  int tid, nthr;
  row_bounds<T, VEC, WARP>(row, tid, nthr, L.rows);
  if (WARP && row >= L.rows) return;  // whole warps only: no block barrier in warp mode
  const int nvec = L.dim / VEC;
  const P* x = reinterpret_cast<const P*>(in + row_offset(L, row));
  const P* w = reinterpret_cast<const P*>(weight);
  P* y = reinterpret_cast<P*>(out + row * L.dim);

  P cache[kCache];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) {
      cache[k] = x[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += to_float(cache[k].v[j]) * to_float(cache[k].v[j]);
    }
  }
  for (int i = tid + kCache * nthr; i < nvec; i += nthr) {
    const P p = x[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) ss += to_float(p.v[j]) * to_float(p.v[j]);
  }
  ss = WARP ? warp_sum(ss) : block_sum(ss, scratch);
  const float inv = rsqrtf(ss / L.dim + eps);

#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) {
      const P wp = w[i];
      P o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = scale_weight(to_float(cache[k].v[j]), inv, wp.v[j]);
      y[i] = o;
    }
  }
  for (int i = tid + kCache * nthr; i < nvec; i += nthr) {
    const P p = x[i], wp = w[i];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = scale_weight(to_float(p.v[j]), inv, wp.v[j]);
    y[i] = o;
  }
}

template <typename T, int VEC, bool WARP>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x_ptr, T* __restrict__ res_ptr,
                                          const T* __restrict__ weight, RowLayout Lx,
                                          RowLayout Lr, float eps) {
  __shared__ float scratch[32];
  using P = Pack<T, VEC>;
  int64_t row;
  int tid, nthr;
  row_bounds<T, VEC, WARP>(row, tid, nthr, Lx.rows);
  if (WARP && row >= Lx.rows) return;
  const int nvec = Lx.dim / VEC;
  P* x = reinterpret_cast<P*>(x_ptr + row_offset(Lx, row));
  P* r = reinterpret_cast<P*>(res_ptr + row_offset(Lr, row));
  const P* w = reinterpret_cast<const P*>(weight);

  P cache[kCache];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) {
      const P a = x[i], b = r[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        cache[k].v[j] = from_float<T>(to_float(a.v[j]) + to_float(b.v[j]));
        const float f = to_float(cache[k].v[j]);
        ss += f * f;
      }
      r[i] = cache[k];
    }
  }
  for (int i = tid + kCache * nthr; i < nvec; i += nthr) {
    const P a = x[i], b = r[i];
    P s;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s.v[j] = from_float<T>(to_float(a.v[j]) + to_float(b.v[j]));
      ss += to_float(s.v[j]) * to_float(s.v[j]);
    }
    r[i] = s;
  }
  ss = WARP ? warp_sum(ss) : block_sum(ss, scratch);
  const float inv = rsqrtf(ss / Lx.dim + eps);

#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) {
      const P wp = w[i];
      P o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = scale_weight(to_float(cache[k].v[j]), inv, wp.v[j]);
      x[i] = o;
    }
  }
  // Rows longer than the register cache re-read the residual this thread wrote.
  for (int i = tid + kCache * nthr; i < nvec; i += nthr) {
    const P s = r[i], wp = w[i];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = scale_weight(to_float(s.v[j]), inv, wp.v[j]);
    x[i] = o;
  }
}

// [D], [N, D] or [N, H, D] with unit last stride; anything else must be contiguous.
RowLayout row_layout(const at::Tensor& t, const char* op, const char* name) {
  SPLITVL_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dim");
  const int64_t D = t.size(-1);
  SPLITVL_CHECK(t.stride(-1) == 1 || D <= 1, op, ": ", name,
              " needs unit stride in the last dim, got strides ", t.strides());
  RowLayout L{t.numel() / std::max<int64_t>(D, 1), 1, D, 0, static_cast<int>(D)};
  if (t.dim() == 2) {
    L.s0 = t.stride(0);
  } else if (t.dim() == 3) {
    L.heads = t.size(1);
    L.s0 = t.stride(0);
    L.s1 = t.stride(1);
  } else if (t.dim() > 3) {
    SPLITVL_CHECK(t.is_contiguous(), op, ": ", name, " with more than 3 dims must be contiguous");
  }
  return L;
}

bool packs_ok(const RowLayout& L, const void* p, int vec) {
  return L.dim % vec == 0 && L.s0 % vec == 0 && L.s1 % vec == 0 && is_aligned16(p);
}

template <typename Launch>
void launch_rows(int64_t rows, int nvec, bool vec, Launch&& launch) {
  const bool warp = nvec <= kWarpRowPacks;
  if (warp) {
    constexpr int warps = 8;
    launch(std::integral_constant<bool, true>{}, vec, ceil_div(rows, warps), warps * 32);
  } else {
    const int threads = std::min(1024, ((nvec + 31) / 32) * 32);
    launch(std::integral_constant<bool, false>{}, vec, static_cast<int>(rows), threads);
  }
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  constexpr const char* op = "rms_norm";
  check_cuda(input, op, "input");
  check_same_device(input, out, op);
  check_same_device(input, weight, op);
  SPLITVL_CHECK(weight.dim() == 1 && weight.size(0) == input.size(-1) && weight.is_contiguous(), op,
              ": weight must be contiguous [D] with D = input.size(-1), got ", weight.sizes(),
              " for input ", input.sizes());
  SPLITVL_CHECK(weight.scalar_type() == input.scalar_type() &&
                  out.scalar_type() == input.scalar_type(),
              op, ": input, weight and out dtypes must match");
  SPLITVL_CHECK(out.is_contiguous() && out.sizes() == input.sizes(), op,
              ": out must be contiguous with the input's shape");
  const RowLayout L = row_layout(input, op, "input");
  if (L.rows == 0 || L.dim == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    constexpr int V = kPack16<scalar_t>;
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x = reinterpret_cast<const scalar_t*>(input.data_ptr());
    const auto* w = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    const bool vec = packs_ok(L, x, V) && is_aligned16(o) && is_aligned16(w);
    launch_rows(L.rows, vec ? L.dim / V : L.dim, vec, [&](auto warp, bool v, int grid, int block) {
      constexpr bool W = decltype(warp)::value;
      if (v)
        rms_norm_kernel<scalar_t, V, W><<<grid, block, 0, stream>>>(o, x, w, L, float(epsilon));
      else
        rms_norm_kernel<scalar_t, 1, W><<<grid, block, 0, stream>>>(o, x, w, L, float(epsilon));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon) {
  constexpr const char* op = "fused_add_rms_norm";
  check_cuda(input, op, "input");
  check_same_device(input, residual, op);
  check_same_device(input, weight, op);
  SPLITVL_CHECK(residual.sizes() == input.sizes() && residual.scalar_type() == input.scalar_type(),
              op, ": residual ", residual.sizes(), " must match input ", input.sizes(),
              " in shape and dtype");
  SPLITVL_CHECK(weight.dim() == 1 && weight.size(0) == input.size(-1) && weight.is_contiguous(), op,
              ": weight must be contiguous [D] with D = input.size(-1)");
  SPLITVL_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype must match input");
  const RowLayout Lx = row_layout(input, op, "input");
  const RowLayout Lr = row_layout(residual, op, "residual");
  if (Lx.rows == 0 || Lx.dim == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    constexpr int V = kPack16<scalar_t>;
    auto* x = reinterpret_cast<scalar_t*>(input.data_ptr());
    auto* r = reinterpret_cast<scalar_t*>(residual.data_ptr());
    const auto* w = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    const bool vec = packs_ok(Lx, x, V) && packs_ok(Lr, r, V) && is_aligned16(w);
    launch_rows(Lx.rows, vec ? Lx.dim / V : Lx.dim, vec, [&](auto warp, bool v, int grid, int block) {
      constexpr bool W = decltype(warp)::value;
      if (v)
        fused_add_rms_norm_kernel<scalar_t, V, W>
            <<<grid, block, 0, stream>>>(x, r, w, Lx, Lr, float(epsilon));
      else
        fused_add_rms_norm_kernel<scalar_t, 1, W>
            <<<grid, block, 0, stream>>>(x, r, w, Lx, Lr, float(epsilon));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
