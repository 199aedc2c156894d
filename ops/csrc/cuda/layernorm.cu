// rms_norm and fused_add_rms_norm (ops/reference.py rms_norm): a weight in the input
// dtype multiplies the normalized value rounded to that dtype (Qwen3); an fp32 weight
// with a bf16/fp16 input scales in fp32 and rounds once (Qwen3.5's `1 + w` norm).
//
// One kernel serves both ops (ADD: the residual is added first and written back).
// One warp per row for short rows (q/k norm over head_dim), one block per row
// otherwise. Each thread keeps its 16-byte packs in registers between the
// reduction and the write, so the input is read once.
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "norm_common.cuh"
#include "ops.cuh"
#include "pdl.cuh"

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

// The rows one launch normalizes. `out` may be `in` (fused_add_rms_norm writes in place);
// `res` is only read and written when the kernel adds the residual.
template <typename T, typename W>
struct NormRows {
  T* out;
  const T* in;
  T* res;
  const W* weight;
  RowLayout lo, li, lr;
  float eps;
};

template <typename T, typename W, int VEC, bool WARP, bool ADD>
__global__ void rms_norm_kernel(NormRows<T, W> a) {
  __shared__ float scratch[32];
  using P = Pack<T, VEC>;
  using PW = Pack<W, VEC>;
  const int64_t row = WARP ? int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5) : blockIdx.x;
  const int tid = WARP ? threadIdx.x & 31 : threadIdx.x;
  const int nthr = WARP ? 32 : blockDim.x;
  if (WARP && row >= a.li.rows) return;  // whole warps only: no block barrier in warp mode
  const int nvec = a.li.dim / VEC;
  const P* x = reinterpret_cast<const P*>(a.in + row_offset(a.li, row));
  P* r = ADD ? reinterpret_cast<P*>(a.res + row_offset(a.lr, row)) : nullptr;
  P* y = reinterpret_cast<P*>(a.out + row_offset(a.lo, row));
  const PW* w = reinterpret_cast<const PW*>(a.weight);
  pdl_wait();  // the input and residual come from the previous kernel
  pdl_launch_dependents();

  // Pack i of the row to normalize: the input, or input + residual rounded to T,
  // which is the new residual.
  const auto load = [&](int i) {
    P p = x[i];
    if constexpr (ADD) {
      const P b = r[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) p.v[j] = from_float<T>(to_float(p.v[j]) + to_float(b.v[j]));
      r[i] = p;
    }
    return p;
  };
  const auto store = [&](int i, const P& p, float inv) {
    const PW wp = w[i];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = scale_weight<T, W>(to_float(p.v[j]), inv, wp.v[j]);
    y[i] = o;
  };

  // The weight is read after the reduction: loading it with the row (more registers per
  // thread) made long rows 1.5x slower on the H200 (T=16384 x 4096: 266 vs 173 us).
  P cache[kCache];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) {
      cache[k] = load(i);
      ss += sum_squares(cache[k]);
    }
  }
  for (int i = tid + kCache * nthr; i < nvec; i += nthr) ss += sum_squares(load(i));
  ss = WARP ? warp_sum(ss) : block_sum(ss, scratch);
  const float inv = rsqrtf(ss / a.li.dim + a.eps);

#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int i = tid + k * nthr;
    if (i < nvec) store(i, cache[k], inv);
  }
  // Rows longer than the register cache re-read the values this thread normalized
  // (the residual it wrote, or the input).
  for (int i = tid + kCache * nthr; i < nvec; i += nthr) {
    if constexpr (ADD) {
      store(i, r[i], inv);
    } else {
      store(i, x[i], inv);
    }
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

// Packs of 16 bytes of T where every row layout and pointer allow (the weight's packs
// are VEC elements of W), else one element per thread.
template <typename T, typename W, bool ADD>
void launch_rows(const NormRows<T, W>& a, cudaStream_t stream) {
  constexpr int V = kPack16<T>;
  const bool vec = packs_ok(a.lo, a.out, V) && packs_ok(a.li, a.in, V) &&
                   (!ADD || packs_ok(a.lr, a.res, V)) &&
                   reinterpret_cast<std::uintptr_t>(a.weight) % (sizeof(W) * V) == 0;
  const int nvec = vec ? a.li.dim / V : a.li.dim;
  if (nvec <= kWarpRowPacks) {
    // Few rows (a decode step's tokens): small blocks spread them over more SMs.
    const int warps = a.li.rows >= 2048 ? 8 : 2;
    const int grid = ceil_div(a.li.rows, warps);
    if (vec)
      launch_pdl(rms_norm_kernel<T, W, V, true, ADD>, grid, warps * 32, 0, stream, a);
    else
      launch_pdl(rms_norm_kernel<T, W, 1, true, ADD>, grid, warps * 32, 0, stream, a);
  } else {
    const int threads = std::min(1024, ((nvec + 31) / 32) * 32);
    const int grid = static_cast<int>(a.li.rows);
    if (vec)
      launch_pdl(rms_norm_kernel<T, W, V, false, ADD>, grid, threads, 0, stream, a);
    else
      launch_pdl(rms_norm_kernel<T, W, 1, false, ADD>, grid, threads, 0, stream, a);
  }
}

void check_weight(const at::Tensor& input, const at::Tensor& weight, const char* op) {
  SPLITVL_CHECK(input.dim() >= 1 && weight.dim() == 1 && weight.size(0) == input.size(-1) &&
                  weight.is_contiguous(),
              op, ": weight must be contiguous [D] with D = input.size(-1), got ", weight.sizes(),
              " for input ", input.sizes());
  SPLITVL_CHECK(weight.scalar_type() == input.scalar_type() || weight.scalar_type() == at::kFloat,
              op, ": weight dtype ", weight.scalar_type(), " must be float32 or the input dtype ",
              input.scalar_type());
}

// out = rms_norm(input (+ residual, written back)) * weight; out may be input itself.
template <bool ADD>
void run_rms_norm(at::Tensor& out, const at::Tensor& input, at::Tensor* residual,
                  const at::Tensor& weight, double epsilon, const char* op) {
  const RowLayout li = row_layout(input, op, "input");
  const RowLayout lo = row_layout(out, op, "out");
  const RowLayout lr = ADD ? row_layout(*residual, op, "residual") : li;
  if (li.rows == 0 || li.dim == 0) return;
  SPLITVL_CHECK(li.rows < (int64_t{1} << 31), op, ": too many rows (", li.rows, ")");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float eps = static_cast<float>(epsilon);
  SPLITVL_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    using T = scalar_t;
    T* o = reinterpret_cast<T*>(out.data_ptr());
    const T* x = reinterpret_cast<const T*>(input.data_ptr());
    T* r = ADD ? reinterpret_cast<T*>(residual->data_ptr()) : nullptr;
    if (weight.scalar_type() == at::kFloat) {
      const auto* w = reinterpret_cast<const float*>(weight.data_ptr());
      launch_rows<T, float, ADD>(NormRows<T, float>{o, x, r, w, lo, li, lr, eps}, stream);
    } else {
      const auto* w = reinterpret_cast<const T*>(weight.data_ptr());
      launch_rows<T, T, ADD>(NormRows<T, T>{o, x, r, w, lo, li, lr, eps}, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  constexpr const char* op = "rms_norm";
  check_cuda_tensors(op, "input", input, out, weight);
  check_weight(input, weight, op);
  SPLITVL_CHECK(out.scalar_type() == input.scalar_type(), op, ": out dtype must match input");
  SPLITVL_CHECK(out.is_contiguous() && out.sizes() == input.sizes(), op,
              ": out must be contiguous with the input's shape");
  run_rms_norm<false>(out, input, nullptr, weight, epsilon, op);
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon) {
  constexpr const char* op = "fused_add_rms_norm";
  check_cuda_tensors(op, "input", input, residual, weight);
  SPLITVL_CHECK(residual.sizes() == input.sizes() && residual.scalar_type() == input.scalar_type(),
              op, ": residual ", residual.sizes(), " must match input ", input.sizes(),
              " in shape and dtype");
  check_weight(input, weight, op);
  run_rms_norm<true>(input, input, &residual, weight, epsilon, op);
}

}  // namespace splitvl::cuda
