// silu_and_mul, gelu_tanh and sigmoid_gate_mul: fp32 math, the reference's roundings to the
// dtype, 16-byte packs.
#include "common.cuh"
#include "ops.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

__device__ __forceinline__ float gelu_tanh_f(float x) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  return 0.5f * x * (1.f + tanhf(kBeta * (x + kKappa * x * x * x)));
}

// grid (rows, packs / kThreads): rows of `2d` inputs -> rows of `d` outputs.
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* in,
                                    int64_t in_row_stride, int d) {
  using P = Pack<T, VEC>;
  pdl_wait();  // the input comes from the previous kernel (pdl.cuh)
  pdl_launch_dependents();
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= d / VEC) return;
  const T* row = in + blockIdx.x * in_row_stride;
  const P a = reinterpret_cast<const P*>(row)[i];
  const P b = reinterpret_cast<const P*>(row + d)[i];
  P o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(silu(to_float(a.v[j])) * to_float(b.v[j]));
  reinterpret_cast<P*>(out + int64_t(blockIdx.x) * d)[i] = o;
}

template <typename T, int VEC>
__global__ void gelu_tanh_kernel(T* __restrict__ out, const T* __restrict__ in, int64_t n) {
  using P = Pack<T, VEC>;
  const int64_t packs = n / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < packs; i += stride) {
    const P a = reinterpret_cast<const P*>(in)[i];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(gelu_tanh_f(to_float(a.v[j])));
    reinterpret_cast<P*>(out)[i] = o;
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride)
    out[i] = from_float<T>(gelu_tanh_f(to_float(in[i])));
}

// Blocks of a grid-stride kernel over `work` items: enough to fill the device, no more.
int grid_stride_blocks(int64_t work) {
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 16;
  return static_cast<int>(std::min<int64_t>(ceil_div(work, kThreads), max_blocks));
}

// A [..., D] tensor as rows r = (a, h) of [A, heads, D] with outer strides (a_stride, h_stride):
// a head view of a wider projection's columns, which no single row stride describes.
struct HeadRows {
  int64_t heads, a_stride, h_stride;
};

__device__ __forceinline__ int64_t row_offset(const HeadRows& l, int64_t r) {
  return (r / l.heads) * l.a_stride + (r % l.heads) * l.h_stride;
}

// Grid-stride over packs of VEC: out row r (contiguous) = x row r * sigmoid(gate row r).
template <typename T, int VEC>
__global__ void sigmoid_gate_mul_kernel(T* __restrict__ out, const T* x, const T* gate,
                                        int64_t rows, int64_t d, HeadRows xl, HeadRows gl) {
  using P = Pack<T, VEC>;
  pdl_wait();  // x and the gate come from earlier kernels (pdl.cuh)
  pdl_launch_dependents();
  const int64_t row_packs = d / VEC, packs = rows * row_packs;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t r = p / row_packs, i = (p - r * row_packs) * VEC;
    const P a = *reinterpret_cast<const P*>(x + row_offset(xl, r) + i);
    const P g = *reinterpret_cast<const P*>(gate + row_offset(gl, r) + i);
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float s = to_float(from_float<T>(1.f / (1.f + __expf(-to_float(g.v[j])))));
      o.v[j] = from_float<T>(to_float(a.v[j]) * s);
    }
    *reinterpret_cast<P*>(out + r * d + i) = o;
  }
}

// t's rows as HeadRows: any outer strides up to 3 dims, more only when they collapse to rows.
HeadRows head_rows(const at::Tensor& t, const char* op, const char* name) {
  SPLITVL_CHECK(t.dim() >= 1 && (t.size(-1) <= 1 || t.stride(-1) == 1), op, ": ", name,
                " needs unit stride in the last dim, got strides ", t.strides());
  if (t.dim() == 1) return {1, 0, 0};
  if (t.dim() == 2) return {1, t.stride(0), 0};
  if (t.dim() == 3) return {t.size(1), t.stride(0), t.stride(1)};
  SPLITVL_CHECK(t.is_contiguous(), op, ": ", name, " with more than 3 dims must be contiguous");
  return {1, t.size(-1), 0};
}

}  // namespace

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  constexpr const char* op = "silu_and_mul";
  check_cuda_tensors(op, "input", input, out);
  SPLITVL_CHECK(input.dim() >= 1 && input.size(-1) % 2 == 0, op,
              ": input last dim must be even, got ", input.sizes());
  SPLITVL_CHECK(out.scalar_type() == input.scalar_type(), op, ": out dtype must match input");
  const int64_t d = input.size(-1) / 2;
  SPLITVL_CHECK(out.is_contiguous() && out.dim() == input.dim() && out.size(-1) == d &&
                  out.numel() * 2 == input.numel(),
              op, ": out must be contiguous [..., ", d, "], got ", out.sizes());
  SPLITVL_CHECK(input.stride(-1) == 1 || d == 0, op, ": input needs unit stride in the last dim");
  SPLITVL_CHECK(input.dim() <= 2 || input.is_contiguous(), op,
              ": input with more than 2 dims must be contiguous");
  const int64_t rows = d == 0 ? 0 : input.numel() / (2 * d);
  if (rows == 0) return;
  SPLITVL_CHECK(rows < (1ll << 31), op, ": too many rows");
  const int64_t row_stride = input.dim() == 2 ? input.stride(0) : 2 * d;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    constexpr int V = kPack16<scalar_t>;
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x = reinterpret_cast<const scalar_t*>(input.data_ptr());
    const bool vec = d % V == 0 && row_stride % V == 0 && is_aligned16(o) && is_aligned16(x);
    const int packs = static_cast<int>(vec ? d / V : d);
    const dim3 grid(static_cast<unsigned>(rows), ceil_div(packs, kThreads));
    if (vec)
      launch_pdl(silu_and_mul_kernel<scalar_t, V>, grid, kThreads, 0, stream, o, x, row_stride, d);
    else
      launch_pdl(silu_and_mul_kernel<scalar_t, 1>, grid, kThreads, 0, stream, o, x, row_stride, d);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// An elementwise op's output: the input's dtype and shape, contiguous.
static void check_elementwise_out(const char* op, const at::Tensor& out, const at::Tensor& input) {
  SPLITVL_CHECK(out.scalar_type() == input.scalar_type(), op, ": out dtype must match input");
  SPLITVL_CHECK(out.is_contiguous() && out.sizes() == input.sizes(), op,
                ": out must be contiguous with the input's shape");
}

void gelu_tanh(at::Tensor& out, const at::Tensor& input) {
  constexpr const char* op = "gelu_tanh";
  check_cuda_tensors(op, "input", input, out);
  check_elementwise_out(op, out, input);
  const int64_t n = input.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x_c = input.contiguous();  // a copy only for strided inputs
  SPLITVL_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    constexpr int V = kPack16<scalar_t>;
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x = reinterpret_cast<const scalar_t*>(x_c.data_ptr());
    const bool vec = is_aligned16(o) && is_aligned16(x);
    const int blocks = grid_stride_blocks(vec ? (n + V - 1) / V : n);
    if (vec)
      gelu_tanh_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(o, x, n);
    else
      gelu_tanh_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(o, x, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sigmoid_gate_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& gate) {
  constexpr const char* op = "sigmoid_gate_mul";
  check_cuda_tensors(op, "input", input, out, gate);
  SPLITVL_CHECK(gate.sizes() == input.sizes() && gate.scalar_type() == input.scalar_type(), op, ": gate ",
                gate.sizes(), " must match input ", input.sizes(), " and its dtype");
  check_elementwise_out(op, out, input);
  const int64_t n = input.numel();
  if (n == 0) return;
  const HeadRows xl = head_rows(input, op, "input"), gl = head_rows(gate, op, "gate");
  const int64_t d = input.size(-1), rows = n / d;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    constexpr int V = kPack16<scalar_t>;
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x = reinterpret_cast<const scalar_t*>(input.data_ptr());
    const auto* g = reinterpret_cast<const scalar_t*>(gate.data_ptr());
    const auto strides_ok = [](const HeadRows& l) { return l.a_stride % V == 0 && l.h_stride % V == 0; };
    const bool vec = d % V == 0 && strides_ok(xl) && strides_ok(gl) && is_aligned16(o) && is_aligned16(x) &&
                     is_aligned16(g);
    const int blocks = grid_stride_blocks(vec ? n / V : n);
    if (vec)
      launch_pdl(sigmoid_gate_mul_kernel<scalar_t, V>, blocks, kThreads, 0, stream, o, x, g, rows, d, xl, gl);
    else
      launch_pdl(sigmoid_gate_mul_kernel<scalar_t, 1>, blocks, kThreads, 0, stream, o, x, g, rows, d, xl, gl);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
