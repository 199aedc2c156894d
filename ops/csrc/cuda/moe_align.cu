// moe_align: sort routed pairs by expert and pad each expert's run to a block
// multiple, on the device (semantics: ops/reference_moe.py); moe_permute: the same
// sort without padding, for a grouped GEMM over per-expert row offsets.
//
// Alignment is one CTA (moe_align_common.cuh): pairs are few (T * k) and a single CTA
// needs no cross-block sync.
// moe_route runs the router's top-k and the alignment in that one CTA when the
// tokens fit one warp each (decode), else the two kernels.
#include "moe_align_common.cuh"
#include "ops.cuh"
#include "pdl.cuh"
#include "topk_common.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kAlignThreads = 256;
// moe_route's single CTA: one warp per token ranks all tokens in one round, then the
// same CTA aligns their pairs from shared memory (no second launch, no global round trip).
constexpr int kRouteThreads = 1024;
constexpr int kRouteTokens = kRouteThreads / 32;

__global__ void __launch_bounds__(kAlignThreads)
    moe_align_kernel(const int32_t* ids, int pairs, int experts, int block,
                     int blocks, int32_t* __restrict__ sorted, int32_t* __restrict__ pos,
                     int32_t* __restrict__ block_experts, int32_t* __restrict__ total) {
  extern __shared__ int smem[];
  pdl_wait();  // the ids come from the previous kernel (pdl.cuh)
  pdl_launch_dependents();
  align_pairs<kAlignThreads>(ids, pairs, experts, block, blocks, smem, sorted, pos,
                             block_experts, total);
}

// moe_permute: one CTA as moe_align, block size 1 (no padding). Prefill sizes (T * k in the
// tens of thousands) take 1,024 threads: a quarter of the chunks, and so of the barriers.
constexpr int kPermuteThreads = 1024;

__global__ void __launch_bounds__(kPermuteThreads)
    moe_permute_kernel(const int32_t* __restrict__ ids, int pairs, int k, int experts,
                       int32_t* __restrict__ row_tokens, int32_t* __restrict__ pos,
                       int32_t* __restrict__ offsets) {
  extern __shared__ int smem[];
  int* counts = smem;                  // [E], then the fill cursor of each expert
  int* start = counts + experts;       // [E] first row of each expert
  int* warp_counts = start + experts;  // [warps, E]
  const int total_rows = count_and_scan<kPermuteThreads>(ids, pairs, experts, 1, counts, start);
  for (int e = threadIdx.x; e < experts; e += kPermuteThreads) {
    offsets[e] = start[e] + counts[e];
    counts[e] = start[e];
  }
  // Rows of dropped pairs gather token 0: a valid row whose result nothing reads.
  for (int r = total_rows + threadIdx.x; r < pairs; r += kPermuteThreads) row_tokens[r] = 0;
  __syncthreads();
  for (int first = 0; first < pairs; first += kPermuteThreads)
    scatter_chunk<kPermuteThreads>(ids, first, pairs, experts, counts, warp_counts, row_tokens,
                                   pos, k);
}

// moe_route for T <= kRouteTokens: warp t ranks token t, its picks go to global memory and
// to shared memory, and the CTA aligns them from there.
template <typename T, int VPT>
__global__ void __launch_bounds__(kRouteThreads)
    moe_route_kernel(float* __restrict__ weights, int32_t* __restrict__ ids,
                     const T* gating, int64_t row_stride, int tokens, int k,
                     bool renormalize, int block, int blocks, int32_t* __restrict__ sorted,
                     int32_t* __restrict__ pos, int32_t* __restrict__ block_experts,
                     int32_t* __restrict__ total, int experts) {
  extern __shared__ int smem[];
  int* picked = smem;  // [T * k]
  pdl_wait();  // the router logits come from the previous kernel (pdl.cuh)
  pdl_launch_dependents();
  const int t = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (t < tokens) {
    const TopkPick pick = topk_row<T, VPT>(gating + t * row_stride, experts, k, renormalize);
    if (lane < k) {
      weights[t * k + lane] = pick.weight;
      ids[t * k + lane] = pick.id;
      picked[t * k + lane] = pick.id;
    }
  }
  __syncthreads();
  align_pairs<kRouteThreads>(picked, tokens * k, experts, block, blocks, smem + tokens * k,
                             sorted, pos, block_experts, total);
}

}  // namespace


void moe_align(at::Tensor& sorted_pairs, at::Tensor& pair_pos, at::Tensor& block_experts,
               at::Tensor& total_padded, const at::Tensor& topk_ids, int64_t num_experts) {
  const int block = check_align_args(sorted_pairs, pair_pos, block_experts, total_padded,
                                     topk_ids, num_experts, "moe_align");
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int experts = static_cast<int>(num_experts);
  const size_t smem = sizeof(int) * size_t(experts) * (2 + kAlignThreads / 32);
  allow_smem(moe_align_kernel, smem);
  launch_pdl(moe_align_kernel, 1, kAlignThreads, smem, stream,
      topk_ids.data_ptr<int32_t>(), static_cast<int>(topk_ids.numel()), experts, block,
      static_cast<int>(block_experts.numel()), sorted_pairs.data_ptr<int32_t>(),
      pair_pos.data_ptr<int32_t>(), block_experts.data_ptr<int32_t>(),
      total_padded.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moe_permute(at::Tensor& row_tokens, at::Tensor& pair_pos, at::Tensor& expert_offsets,
                 const at::Tensor& topk_ids, int64_t num_experts) {
  constexpr const char* op = "moe_permute";
  check_cuda(topk_ids, op, "topk_ids");
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&row_tokens, &pair_pos, &expert_offsets, &topk_ids}) {
    check_same_device(topk_ids, *t, op);
    SPLITVL_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), op,
                  ": topk_ids and the outputs must be contiguous int32");
  }
  SPLITVL_CHECK(topk_ids.dim() == 2, op, ": topk_ids must be [T, k]");
  SPLITVL_CHECK(num_experts >= 1 && num_experts <= 1024, op, ": 1..1024 experts, got ",
                num_experts);
  const int64_t pairs = topk_ids.numel();
  SPLITVL_CHECK(row_tokens.numel() == pairs && pair_pos.numel() == pairs &&
                    expert_offsets.numel() == num_experts && pairs < (int64_t(1) << 30),
                op, ": row_tokens and pair_pos must hold T*k=", pairs,
                " values, expert_offsets E=", num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int experts = static_cast<int>(num_experts);
  const size_t smem = sizeof(int) * size_t(experts) * (2 + kPermuteThreads / 32);
  allow_smem(moe_permute_kernel, smem);
  moe_permute_kernel<<<1, kPermuteThreads, smem, stream>>>(
      topk_ids.data_ptr<int32_t>(), static_cast<int>(pairs),
      static_cast<int>(std::max<int64_t>(topk_ids.size(1), 1)), experts,
      row_tokens.data_ptr<int32_t>(), pair_pos.data_ptr<int32_t>(),
      expert_offsets.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moe_route(at::Tensor& topk_weights, at::Tensor& topk_ids, at::Tensor& sorted_pairs,
               at::Tensor& pair_pos, at::Tensor& block_experts, at::Tensor& total_padded,
               const at::Tensor& gating_output, bool renormalize) {
  constexpr const char* op = "moe_route";
  check_topk_args(topk_weights, topk_ids, gating_output, op);
  const int64_t experts = gating_output.size(1);
  const int block = check_align_args(sorted_pairs, pair_pos, block_experts, total_padded,
                                     topk_ids, experts, op);
  const int64_t tokens = gating_output.size(0), k = topk_weights.size(1);
  const size_t smem = sizeof(int) * size_t(tokens * k + experts * (2 + kRouteThreads / 32));
  // Two launches beyond a warp per token, or for E > 512 (shared memory, and VPT 32 spills).
  if (tokens == 0 || tokens > kRouteTokens || experts > 512) {
    topk_softmax(topk_weights, topk_ids, gating_output, renormalize);
    moe_align(sorted_pairs, pair_pos, block_experts, total_padded, topk_ids, experts);
    return;
  }
  const c10::cuda::CUDAGuard guard(gating_output.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(gating_output.scalar_type(), op, [&] {
    const auto* g = reinterpret_cast<const scalar_t*>(gating_output.data_ptr());
    dispatch_topk_vpt(static_cast<int>(experts), [&](auto vpt) {
      auto kernel = moe_route_kernel<scalar_t, decltype(vpt)::value>;
      allow_smem(kernel, smem);
      launch_pdl(kernel, 1, kRouteThreads, smem, stream,
          topk_weights.data_ptr<float>(), topk_ids.data_ptr<int32_t>(), g,
          gating_output.stride(0), static_cast<int>(tokens), static_cast<int>(k), renormalize,
          block, static_cast<int>(block_experts.numel()), sorted_pairs.data_ptr<int32_t>(),
          pair_pos.data_ptr<int32_t>(), block_experts.data_ptr<int32_t>(),
          total_padded.data_ptr<int32_t>(), static_cast<int>(experts));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
