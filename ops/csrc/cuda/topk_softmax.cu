// topk_softmax: MoE router, fp32 softmax over experts then top-k (ties: lower index).
//
// One warp per token; each lane keeps E / 32 probabilities in registers, and each
// of the k rounds is a warp arg-max.
#include "common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr float kTaken = -2.f;  // below any probability

template <typename T, int VPT>
__global__ void topk_softmax_kernel(float* __restrict__ weights, int32_t* __restrict__ ids,
                                    const T* __restrict__ gating, int64_t row_stride,
                                    int64_t tokens, int experts, int k, bool renormalize) {
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t >= tokens) return;
  const T* g = gating + t * row_stride;
  float p[VPT];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + 32 * j;
    p[j] = e < experts ? to_float(g[e]) : -INFINITY;
    mx = fmaxf(mx, p[j]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + 32 * j;
    p[j] = e < experts ? expf(p[j] - mx) : 0.f;
    sum += p[j];
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int j = 0; j < VPT; ++j) p[j] = lane + 32 * j < experts ? p[j] / sum : kTaken;

  float my_weight = 0.f, picked = 0.f;
  int my_id = 0;
  for (int r = 0; r < k; ++r) {
    float best = kTaken;
    int best_id = experts;
#pragma unroll
    for (int j = 0; j < VPT; ++j)  // ascending index: strict > keeps the lowest on ties
      if (p[j] > best) {
        best = p[j];
        best_id = lane + 32 * j;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (ob > best || (ob == best && oi < best_id)) {
        best = ob;
        best_id = oi;
      }
    }
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      if (lane + 32 * j == best_id) p[j] = kTaken;
    if (lane == r) {
      my_weight = best;
      my_id = best_id;
    }
    picked += best;
  }
  if (lane < k) {
    weights[t * k + lane] = renormalize ? my_weight / picked : my_weight;
    ids[t * k + lane] = my_id;
  }
}

}  // namespace

void topk_softmax(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& gating_output,
                  bool renormalize) {
  constexpr const char* op = "topk_softmax";
  check_cuda_tensors(op, "gating_output", gating_output, topk_weights, topk_ids);
  SPLITVL_CHECK(gating_output.dim() == 2, op, ": gating_output must be [T, E], got ",
              gating_output.sizes());
  const int64_t T = gating_output.size(0);
  const int E = static_cast<int>(gating_output.size(1));
  SPLITVL_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == T &&
                  topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              op, ": topk_weights must be contiguous fp32 [T, k]");
  SPLITVL_CHECK(topk_ids.sizes() == topk_weights.sizes() && topk_ids.scalar_type() == at::kInt &&
                  topk_ids.is_contiguous(),
              op, ": topk_ids must be contiguous int32 with topk_weights' shape");
  const int k = static_cast<int>(topk_weights.size(1));
  SPLITVL_CHECK(k >= 1 && k <= 32 && k <= E, op, ": topk ", k, " must be in [1, min(32, E=", E, ")]");
  SPLITVL_CHECK(E <= 1024, op, ": at most 1024 experts, got ", E);
  SPLITVL_CHECK(gating_output.stride(1) == 1, op, ": gating_output needs unit stride over experts");
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(gating_output.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int blocks = ceil_div(T, kWarpsPerBlock);
  SPLITVL_DISPATCH_FLOAT(gating_output.scalar_type(), op, [&] {
    const auto* g = reinterpret_cast<const scalar_t*>(gating_output.data_ptr());
    auto launch = [&](auto vpt) {
      topk_softmax_kernel<scalar_t, decltype(vpt)::value><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          topk_weights.data_ptr<float>(), topk_ids.data_ptr<int32_t>(), g, gating_output.stride(0),
          T, E, k, renormalize);
    };
    if (E <= 32) launch(std::integral_constant<int, 1>{});
    else if (E <= 64) launch(std::integral_constant<int, 2>{});
    else if (E <= 128) launch(std::integral_constant<int, 4>{});
    else if (E <= 256) launch(std::integral_constant<int, 8>{});
    else if (E <= 512) launch(std::integral_constant<int, 16>{});
    else launch(std::integral_constant<int, 32>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
