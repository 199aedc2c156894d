// moe_align: sort routed pairs by expert and pad each expert's run to a block
// multiple, on the device (semantics: ops/reference_moe.py); moe_permute: the same
// sort without padding, for a grouped GEMM over per-expert row offsets.
//
// Alignment is one CTA: pairs are few (T * k) and a single CTA needs no
// cross-block sync. Within an expert, pairs keep ascending order: each chunk of
// as many pairs as threads ranks its lanes per warp (__match_any_sync), then warps
// in order, then chunks in order, so the result equals a stable sort.
// moe_route runs the router's top-k and the alignment in that one CTA when the
// tokens fit one warp each (decode), else the two kernels.
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

__device__ __forceinline__ int padded_count(int count, int block) {
  return (count + block - 1) / block * block;
}

// Exclusive scan of the padded counts into start[e] (warp 0); returns the total.
__device__ int scan_padded_counts(const int* counts, int* start, int experts, int block) {
  const int lane = threadIdx.x & 31;
  int running = 0;
  for (int base = 0; base < experts; base += 32) {
    const int e = base + lane;
    const int c = e < experts ? padded_count(counts[e], block) : 0;
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (e < experts) start[e] = running + incl - c;
    running += __shfl_sync(0xffffffffu, incl, 31);
  }
  return running;
}

// Each expert's routed pairs counted into counts[E], their padded runs scanned into start[E];
// returns the rows in use (every thread gets it).
template <int THREADS>
__device__ int count_and_scan(const int32_t* ids, int pairs, int experts, int block, int* counts,
                              int* start) {
  __shared__ int total_rows;
  for (int e = threadIdx.x; e < experts; e += THREADS) counts[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += THREADS) {
    const int e = ids[p];
    if (e >= 0 && e < experts) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int rows = scan_padded_counts(counts, start, experts, block);
    if (threadIdx.x == 0) total_rows = rows;
  }
  __syncthreads();
  return total_rows;
}

// Scatter one chunk of THREADS pairs to their sorted rows, each row holding p / divisor
// (the pair, or its token); cursor[e] is expert e's next free row; warp_counts holds
// [THREADS / 32, E].
template <int THREADS>
__device__ void scatter_chunk(const int32_t* ids, int first, int pairs, int experts, int* cursor,
                              int* warp_counts, int32_t* sorted, int32_t* pos, int divisor) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int p = first + threadIdx.x;
  const int e = p < pairs ? ids[p] : -1;
  const bool routed = e >= 0 && e < experts;
  constexpr int kWarps = THREADS / 32;
  for (int i = threadIdx.x; i < kWarps * experts; i += THREADS) warp_counts[i] = 0;
  __syncthreads();
  const unsigned same = __match_any_sync(0xffffffffu, routed ? e : -1);
  const int rank = __popc(same & ((1u << lane) - 1));
  if (routed && rank == 0) warp_counts[warp * experts + e] = __popc(same);
  __syncthreads();
  for (int x = threadIdx.x; x < experts; x += THREADS) {
    int run = cursor[x];
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_counts[w * experts + x];
      warp_counts[w * experts + x] = run;
      run += c;
    }
    cursor[x] = run;
  }
  __syncthreads();
  if (routed) {
    const int row = warp_counts[warp * experts + e] + rank;
    sorted[row] = p / divisor;
    pos[p] = row;
  } else if (p < pairs) {
    pos[p] = -1;
  }
  __syncthreads();
}

// The alignment of `pairs` routed pairs by THREADS threads (the whole CTA); ids may live in
// global or shared memory; smem holds [E * (2 + THREADS / 32)] ints.
template <int THREADS>
__device__ void align_pairs(const int32_t* ids, int pairs, int experts, int block, int blocks,
                            int* smem, int32_t* __restrict__ sorted, int32_t* __restrict__ pos,
                            int32_t* __restrict__ block_experts, int32_t* __restrict__ total) {
  int* counts = smem;             // [E], then the fill cursor of each expert
  int* start = counts + experts;  // [E] first padded row of each expert
  int* warp_counts = start + experts;  // [warps, E]
  const int total_rows = count_and_scan<THREADS>(ids, pairs, experts, block, counts, start);
  if (threadIdx.x == 0) total[0] = total_rows;
  for (int b = threadIdx.x; b < blocks; b += THREADS) {
    const int row = b * block;
    int owner = -1;
    if (row < total_rows) {  // the last expert whose run starts at or before row
      int lo = 0, hi = experts - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (start[mid] <= row) lo = mid;
        else hi = mid - 1;
      }
      owner = lo;
    }
    block_experts[b] = owner;
  }
  for (int r = threadIdx.x; r < blocks * block; r += THREADS) sorted[r] = pairs;
  for (int e = threadIdx.x; e < experts; e += THREADS) counts[e] = start[e];
  __syncthreads();
  for (int first = 0; first < pairs; first += THREADS)
    scatter_chunk<THREADS>(ids, first, pairs, experts, counts, warp_counts, sorted, pos, 1);
}

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

namespace {

// The checks of moe_align's arguments; returns the block size.
int check_align_args(const at::Tensor& sorted_pairs, const at::Tensor& pair_pos,
                     const at::Tensor& block_experts, const at::Tensor& total_padded,
                     const at::Tensor& topk_ids, int64_t num_experts, const char* op) {
  check_cuda(topk_ids, op, "topk_ids");
  for (const at::Tensor* t : {&sorted_pairs, &pair_pos, &block_experts, &total_padded}) {
    check_same_device(topk_ids, *t, op);
    SPLITVL_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), op,
                  ": outputs must be contiguous int32");
  }
  SPLITVL_CHECK(topk_ids.scalar_type() == at::kInt && topk_ids.is_contiguous(), op,
                ": topk_ids must be contiguous int32");
  SPLITVL_CHECK(num_experts >= 1 && num_experts <= 1024, op, ": 1..1024 experts, got ",
                num_experts);
  const int64_t pairs = topk_ids.numel();
  const int64_t capacity = sorted_pairs.numel(), blocks = block_experts.numel();
  SPLITVL_CHECK(pair_pos.numel() == pairs && total_padded.numel() == 1 &&
                    (blocks > 0 ? capacity % blocks == 0 : capacity == 0),
                op, ": output sizes do not match (pairs ", pairs, ", capacity ", capacity,
                ", blocks ", blocks, ")");
  SPLITVL_CHECK(pairs < (int64_t(1) << 30), op, ": too many pairs");
  return blocks > 0 ? static_cast<int>(capacity / blocks) : 16;
}

// Dynamic shared memory of a kernel, opting in above the default 48 KB.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)));
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
