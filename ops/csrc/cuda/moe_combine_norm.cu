// moe_combine_add_rms_norm: a MoE block's combine folded into the next layer's input norm
// (semantics: ops/reference_moe.py). One CTA per token sums its k expert rows in fp32 (j
// order, weighted when topk_weights is given) and rounds to T as moe_combine does, adds the
// residual and rounds as fused_add_rms_norm does (the new residual, written back), then
// normalizes. The arithmetic is the two kernels' in the same order, so the results agree with
// the two-op chain up to the compiler's fused multiply-adds (in practice bit for bit).
//
// Launched with PDL (pdl.cuh): the rows, positions, router weights and residual come from
// earlier kernels, so they are read after pdl_wait with coherent loads; the norm weight last.
#include "common.cuh"
#include "norm_common.cuh"
#include "ops.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kCombineCache = 4;  // packs a thread keeps in registers between sum and scale

template <typename T, typename W>
struct CombineNormArgs {
  T* out;  // [T, H]
  T* residual;  // [T, H], rows residual_stride apart
  const T* y;  // [rows, H] expert outputs
  const int32_t* pos;  // [T, k]
  const float* weights;  // [T, k] or nullptr
  const W* norm_weight;  // [H]
  int64_t residual_stride;
  int k, hidden;
  float eps;
};

template <typename T, typename W, int VEC>
__global__ void moe_combine_add_rms_norm_kernel(CombineNormArgs<T, W> a) {
  __shared__ float scratch[32];
  using P = Pack<T, VEC>;
  const int64_t t = blockIdx.x;
  const int packs = a.hidden / VEC;
  const P* rows = reinterpret_cast<const P*>(a.y);
  P* res = reinterpret_cast<P*>(a.residual + t * a.residual_stride);
  P* out = reinterpret_cast<P*>(a.out + t * a.hidden);
  const int32_t* my_pos = a.pos + t * a.k;
  pdl_wait();  // every input but the norm weight comes from earlier kernels
  pdl_launch_dependents();

  // Pack i of the new residual: the combine rounded to T, plus the residual, rounded again.
  const auto add = [&](int i) {
    float acc[VEC] = {};
    for (int j = 0; j < a.k; ++j) {
      const int row = my_pos[j];
      if (row < 0) continue;  // a dropped pair adds nothing
      const float w = a.weights != nullptr ? a.weights[t * a.k + j] : 1.f;
      const P v = rows[int64_t(row) * packs + i];
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] += w * to_float(v.v[q]);
    }
    P r = res[i];
#pragma unroll
    for (int q = 0; q < VEC; ++q) r.v[q] = from_float<T>(to_float(from_float<T>(acc[q])) + to_float(r.v[q]));
    res[i] = r;
    return r;
  };
  const auto squares = [](const P& p) {
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < VEC; ++q) s += to_float(p.v[q]) * to_float(p.v[q]);
    return s;
  };
  const auto store = [&](int i, const P& p, float inv) {
    P o;
#pragma unroll
    for (int q = 0; q < VEC; ++q) o.v[q] = scale_weight<T, W>(to_float(p.v[q]), inv, a.norm_weight[i * VEC + q]);
    out[i] = o;
  };

  P cache[kCombineCache];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < kCombineCache; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) {
      cache[c] = add(i);
      ss += squares(cache[c]);
    }
  }
  for (int i = threadIdx.x + kCombineCache * blockDim.x; i < packs; i += blockDim.x) ss += squares(add(i));
  const float inv = rsqrtf(block_sum(ss, scratch) / a.hidden + a.eps);
#pragma unroll
  for (int c = 0; c < kCombineCache; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) store(i, cache[c], inv);
  }
  // Beyond the register cache: the residual packs this thread itself wrote.
  for (int i = threadIdx.x + kCombineCache * blockDim.x; i < packs; i += blockDim.x) store(i, res[i], inv);
}

void check_combine_norm_args(const at::Tensor& out, const at::Tensor& residual, const at::Tensor& y,
                             const at::Tensor& pair_pos, const std::optional<at::Tensor>& topk_weights,
                             const at::Tensor& weight, const char* op) {
  check_cuda_tensors(op, "y", y, out, residual, pair_pos, weight);
  SPLITVL_CHECK(pair_pos.dim() == 2 && pair_pos.scalar_type() == at::kInt && pair_pos.is_contiguous(),
                op, ": pair_pos must be contiguous int32 [T, k]");
  const int64_t tokens = pair_pos.size(0);
  SPLITVL_CHECK(y.dim() == 2 && y.is_contiguous() && out.is_contiguous() &&
                    out.scalar_type() == y.scalar_type() &&
                    out.sizes() == at::IntArrayRef({tokens, y.size(1)}),
                op, ": out [T, H] and y [rows, H] must be contiguous, same dtype");
  SPLITVL_CHECK(residual.sizes() == out.sizes() && residual.scalar_type() == y.scalar_type() &&
                    residual.stride(1) == 1,
                op, ": residual must be [T, H] in y's dtype with unit stride over H, got ",
                residual.sizes());
  SPLITVL_CHECK(weight.dim() == 1 && weight.size(0) == y.size(1) && weight.is_contiguous() &&
                    (weight.scalar_type() == y.scalar_type() || weight.scalar_type() == at::kFloat),
                op, ": weight must be contiguous [H] in y's dtype or fp32");
  if (topk_weights.has_value()) {
    check_same_device(y, *topk_weights, op);
    SPLITVL_CHECK(topk_weights->scalar_type() == at::kFloat && topk_weights->is_contiguous() &&
                      topk_weights->sizes() == pair_pos.sizes(),
                  op, ": topk_weights must be contiguous fp32 ", pair_pos.sizes());
  }
}

template <typename T, typename W>
void launch_combine_norm(const CombineNormArgs<T, W>& a, int64_t tokens, cudaStream_t stream) {
  constexpr int V = kPack16<T>;
  const bool vec = a.hidden % V == 0 && a.residual_stride % V == 0 && is_aligned16(a.out) &&
                   is_aligned16(a.residual) && is_aligned16(a.y) &&
                   reinterpret_cast<std::uintptr_t>(a.norm_weight) % (sizeof(W) * V) == 0;
  const int packs = vec ? a.hidden / V : a.hidden;
  const int threads = std::min(1024, (packs + 31) / 32 * 32);
  if (vec)
    launch_pdl(moe_combine_add_rms_norm_kernel<T, W, V>, static_cast<unsigned>(tokens), threads, 0, stream, a);
  else
    launch_pdl(moe_combine_add_rms_norm_kernel<T, W, 1>, static_cast<unsigned>(tokens), threads, 0, stream, a);
}

}  // namespace

void moe_combine_add_rms_norm(at::Tensor& out, at::Tensor& residual, const at::Tensor& y,
                              const at::Tensor& pair_pos, const std::optional<at::Tensor>& topk_weights,
                              const at::Tensor& weight, double epsilon) {
  constexpr const char* op = "moe_combine_add_rms_norm";
  check_combine_norm_args(out, residual, y, pair_pos, topk_weights, weight, op);
  const int64_t tokens = pair_pos.size(0);
  if (tokens == 0 || y.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float* weights = topk_weights.has_value() ? topk_weights->data_ptr<float>() : nullptr;
  SPLITVL_DISPATCH_FLOAT(y.scalar_type(), op, [&] {
    using T = scalar_t;
    T* o = reinterpret_cast<T*>(out.data_ptr());
    T* r = reinterpret_cast<T*>(residual.data_ptr());
    const T* rows = reinterpret_cast<const T*>(y.data_ptr());
    const int k = static_cast<int>(pair_pos.size(1)), hidden = static_cast<int>(y.size(1));
    const float eps = static_cast<float>(epsilon);
    if (weight.scalar_type() == at::kFloat) {
      launch_combine_norm<T, float>({o, r, rows, pair_pos.data_ptr<int32_t>(), weights,
                                     weight.data_ptr<float>(), residual.stride(0), k, hidden, eps},
                                    tokens, stream);
    } else {
      launch_combine_norm<T, T>({o, r, rows, pair_pos.data_ptr<int32_t>(), weights,
                                 reinterpret_cast<const T*>(weight.data_ptr()), residual.stride(0), k,
                                 hidden, eps},
                                tokens, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
