// moe_combine: the deterministic gather-sum of each token's k expert rows (fp32, in j
// order), each row times its router weight when topk_weights is given (the grouped-GEMM
// path's rows are unweighted; moe_down's rows already are). Semantics: ops/reference_moe.py.
// Launched with PDL (pdl.cuh): every input comes from earlier kernels, so each thread waits
// first and reads them with coherent loads (no const __restrict__ / __ldg).
#include "common.cuh"
#include "ops.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {
namespace {

// weights: fp32 [T, k], or nullptr (every routed row counts once).
template <typename T>
__global__ void moe_combine_kernel(T* __restrict__ out, const T* y, const int32_t* pos,
                                   const float* weights, int k, int hidden) {
  const int64_t t = blockIdx.x;
  pdl_wait();  // the expert rows, positions and weights come from earlier kernels
  pdl_launch_dependents();
  const int32_t* my_pos = pos + t * k;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < k; ++j) {
      const int row = my_pos[j];
      const float w = weights != nullptr ? weights[t * k + j] : 1.f;
      if (row >= 0) acc += w * to_float(y[int64_t(row) * hidden + c]);
    }
    out[t * hidden + c] = from_float<T>(acc);
  }
}

// 16-byte rows (hidden % pack == 0, aligned): a thread owns one pack of columns (one CTA
// covers H 2048) and reads the positions of kCombineGroup pairs at once, then their rows
// (L2 hits: the down GEMM just wrote them), instead of k dependent loads per column. Sums
// stay fp32 in j order.
constexpr int kCombineGroup = 8;

template <typename T>
__global__ void moe_combine_pack_kernel(T* __restrict__ out, const T* y, const int32_t* pos,
                                        const float* weights, int k, int hidden) {
  constexpr int N = kPack16<T>;
  using P = Pack<T, N>;
  const int64_t t = blockIdx.x;
  pdl_wait();  // the expert rows, positions and weights come from earlier kernels
  pdl_launch_dependents();
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * N;
  if (c >= hidden) return;
  const int32_t* my_pos = pos + t * k;
  float acc[N] = {};
  for (int j0 = 0; j0 < k; j0 += kCombineGroup) {
    int rows[kCombineGroup];
    float w[kCombineGroup];
#pragma unroll
    for (int u = 0; u < kCombineGroup; ++u) {
      rows[u] = j0 + u < k ? my_pos[j0 + u] : -1;
      w[u] = weights != nullptr && j0 + u < k ? weights[t * k + j0 + u] : 1.f;
    }
    P v[kCombineGroup];  // a dropped pair reads row 0 and adds nothing
#pragma unroll
    for (int u = 0; u < kCombineGroup; ++u)
      v[u] = *reinterpret_cast<const P*>(y + int64_t(max(rows[u], 0)) * hidden + c);
#pragma unroll
    for (int u = 0; u < kCombineGroup; ++u)
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] += rows[u] >= 0 ? w[u] * to_float(v[u].v[i]) : 0.f;
  }
  P o;
#pragma unroll
  for (int i = 0; i < N; ++i) o.v[i] = from_float<T>(acc[i]);
  *reinterpret_cast<P*>(out + t * hidden + c) = o;
}

// The router weights' pointer, after their checks; nullptr when none are given.
const float* checked_weights(const std::optional<at::Tensor>& topk_weights,
                             const at::Tensor& pair_pos, const char* op) {
  if (!topk_weights.has_value()) return nullptr;
  const at::Tensor& w = *topk_weights;
  check_same_device(pair_pos, w, op);
  SPLITVL_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.sizes() == pair_pos.sizes(),
                op, ": topk_weights must be contiguous fp32 ", pair_pos.sizes(), ", got ",
                w.sizes());
  return w.data_ptr<float>();
}

}  // namespace

void moe_combine(at::Tensor& out, const at::Tensor& y, const at::Tensor& pair_pos,
                 const std::optional<at::Tensor>& topk_weights) {
  constexpr const char* op = "moe_combine";
  check_cuda(y, op, "y");
  check_same_device(y, out, op);
  check_same_device(y, pair_pos, op);
  SPLITVL_CHECK(pair_pos.dim() == 2 && pair_pos.scalar_type() == at::kInt &&
                    pair_pos.is_contiguous(),
                op, ": pair_pos must be contiguous int32 [T, k]");
  SPLITVL_CHECK(y.dim() == 2 && y.is_contiguous() && out.is_contiguous() &&
                    out.scalar_type() == y.scalar_type() &&
                    out.sizes() == at::IntArrayRef({pair_pos.size(0), y.size(1)}),
                op, ": out [T, H] and y [rows, H] must be contiguous, same dtype");
  const float* weights = checked_weights(topk_weights, pair_pos, op);
  const int64_t tokens = pair_pos.size(0);
  if (tokens == 0 || y.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int hidden = static_cast<int>(y.size(1));
  const int k = static_cast<int>(pair_pos.size(1));
  SPLITVL_DISPATCH_FLOAT(y.scalar_type(), op, [&] {
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* rows = reinterpret_cast<const scalar_t*>(y.data_ptr());
    constexpr int pack = kPack16<scalar_t>;
    if (hidden % pack == 0 && is_aligned16(o) && is_aligned16(rows)) {
      const int packs = hidden / pack;
      const int threads = std::min(256, (packs + 31) / 32 * 32);
      const dim3 grid(static_cast<unsigned>(tokens), ceil_div(packs, threads));
      launch_pdl(moe_combine_pack_kernel<scalar_t>, grid, threads, 0, stream, o, rows,
                 pair_pos.data_ptr<int32_t>(), weights, k, hidden);
    } else {
      const int threads = std::min(512, (hidden + 31) / 32 * 32);
      launch_pdl(moe_combine_kernel<scalar_t>, static_cast<unsigned>(tokens), threads, 0, stream, o, rows,
                 pair_pos.data_ptr<int32_t>(), weights, k, hidden);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
