// The device side of the MoE pair alignment (semantics: ops/reference_moe.py moe_align), shared
// by moe_align.cu (moe_align, moe_permute, moe_route) and moe_gate_route.cu: one CTA sorts the
// routed pairs by expert and pads each expert's run to a block multiple.
//
// Within an expert, pairs keep ascending order: each chunk of as many pairs as threads ranks
// its lanes per warp (__match_any_sync), then warps in order, then chunks in order, so the
// result equals a stable sort.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace splitvl::cuda {

__device__ __forceinline__ int padded_count(int count, int block) {
  return (count + block - 1) / block * block;
}

// Exclusive scan of the padded counts into start[e] (warp 0); returns the total.
__device__ __forceinline__ int scan_padded_counts(const int* counts, int* start, int experts, int block) {
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

// The checks of moe_align's arguments; returns the block size.
inline int check_align_args(const at::Tensor& sorted_pairs, const at::Tensor& pair_pos,
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

}  // namespace splitvl::cuda
