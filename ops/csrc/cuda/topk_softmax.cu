// topk_softmax: MoE router, fp32 softmax over experts then top-k (ties: lower index).
//
// One warp per token (topk_common.cuh).
#include "ops.cuh"
#include "topk_common.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T, int VPT>
__global__ void topk_softmax_kernel(float* __restrict__ weights, int32_t* __restrict__ ids,
                                    const T* __restrict__ gating, int64_t row_stride,
                                    int64_t tokens, int experts, int k, bool renormalize) {
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t >= tokens) return;
  const TopkPick pick = topk_row<T, VPT>(gating + t * row_stride, experts, k, renormalize);
  if (lane < k) {
    weights[t * k + lane] = pick.weight;
    ids[t * k + lane] = pick.id;
  }
}

}  // namespace

void topk_softmax(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& gating_output,
                  bool renormalize) {
  constexpr const char* op = "topk_softmax";
  check_topk_args(topk_weights, topk_ids, gating_output, op);
  const int64_t T = gating_output.size(0);
  const int E = static_cast<int>(gating_output.size(1));
  const int k = static_cast<int>(topk_weights.size(1));
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(gating_output.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int blocks = ceil_div(T, kWarpsPerBlock);
  SPLITVL_DISPATCH_FLOAT(gating_output.scalar_type(), op, [&] {
    const auto* g = reinterpret_cast<const scalar_t*>(gating_output.data_ptr());
    dispatch_topk_vpt(E, [&](auto vpt) {
      topk_softmax_kernel<scalar_t, decltype(vpt)::value><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          topk_weights.data_ptr<float>(), topk_ids.data_ptr<int32_t>(), g, gating_output.stride(0),
          T, E, k, renormalize);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
