// Pieces shared by the two paged_attention_decode kernels (CUDA cores for small GQA
// groups and fp32, tensor cores for groups of 4 or more): parameters, the staging of
// a partition's cache rows, and the merge of the warps' partial results.
#pragma once

#include "attention_common.cuh"
#include "common.cuh"

namespace splitvl::cuda {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kMaxPartition = 512;

template <typename T>
struct DecodeParams {
  const T* q;
  int64_t q_s0, q_s1;
  const T* key_cache;  // [num_blocks, block_size, Hkv, D]
  const T* value_cache;
  const int* block_tables;
  int64_t bt_s0, bt_s1;
  int max_blocks;
  const int* seq_lens;
  T* out;           // [B, Hq, D]
  float* part_out;  // [B, Hq, splits, D]
  float* part_max;  // [B, Hq, splits], base 2
  float* part_sum;
  int* merge_tickets;  // the fused merge's counters (paged_decode_merge.cuh); null: the merge kernel
  int merge_chunk;     // partitions per first-level merge of the fused merge
  int merge_chunks;    // ceil(splits / merge_chunk)
  int num_q_heads, num_kv_heads, group, head_dim, block_size, part, splits;
  float scale;
};

// What a CTA of grid (Hkv * ceil(group / GT), B, splits) serves: query heads
// [h0, h0 + heads) of KV head kv_head, sequence b, partition `split` starting at token `start`.
struct DecodeCta {
  int kv_head, b, split, h0, heads, start;
};

template <typename T>
__device__ __forceinline__ DecodeCta decode_cta(const DecodeParams<T>& p, int gt) {
  const int groups_per_kv = (p.group + gt - 1) / gt;
  const int kv_head = blockIdx.x / groups_per_kv, hg = blockIdx.x % groups_per_kv;
  const int split = blockIdx.z;
  return {kv_head, int(blockIdx.y), split, kv_head * p.group + hg * gt, min(gt, p.group - hg * gt),
          split * p.part};
}

constexpr int kRowsPerThread = kMaxPartition / kDecodeThreads;

// Physical block of each of this thread's kMaxPartition / threads tokens of the partition
// starting at `start` (clamped to the table): issued before seq_len is known.
template <typename T>
__device__ __forceinline__ void load_phys(const DecodeParams<T>& p, int b, int start,
                                          int (&phys)[kRowsPerThread]) {
  const int* table = p.block_tables + b * p.bt_s0;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int t = start + int(threadIdx.x) + r * kDecodeThreads;
    phys[r] = table[min(t / p.block_size, p.max_blocks - 1) * p.bt_s1];
  }
}

// rows[i] = cache row (slot * Hkv) of token start + i, for all kMaxPartition tokens: a
// condition would delay the loads.
template <typename T>
__device__ __forceinline__ void store_rows(const DecodeParams<T>& p, int start,
                                           const int (&phys)[kRowsPerThread], int* rows) {
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int t = start + threadIdx.x + r * kDecodeThreads;
    rows[threadIdx.x + r * kDecodeThreads] = (phys[r] * p.block_size + t % p.block_size) * p.num_kv_heads;
  }
}

// After a __syncthreads: each warp left, per head g < GT, its unnormalised output in
// red_acc[warp, g, :], its max (base 2) in red_m and its sum in red_w. Merges the warps
// and writes the normalised output (`direct`: the sequence's only partition) or the
// partition's (max, sum, output).
template <typename T, int GT>
__device__ __forceinline__ void finish_partition(const DecodeParams<T>& p, const float* red_acc,
                                                 const float* red_m, float* red_w, int b, int h0,
                                                 int heads, int split, bool direct) {
  const int D = p.head_dim;
  if (threadIdx.x < GT) {  // one thread per head: the warps' merge weights
    const int g = threadIdx.x;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, red_m[w * GT + g]);
    const float ms = mx == -INFINITY ? 0.f : mx;
    float e[kDecodeWarps], sum = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      e[w] = exp2f(red_m[w * GT + g] - ms);
      sum += red_w[w * GT + g] * e[w];
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) red_w[w * GT + g] = e[w] * inv;
    if (!direct && g < heads) {
      const int64_t bhs = (int64_t(b) * p.num_q_heads + h0 + g) * p.splits + split;
      p.part_max[bhs] = mx;
      p.part_sum[bhs] = sum;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < heads * D; i += kDecodeThreads) {
    const int g = i / D, d = i - g * D;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) o += red_acc[(w * GT + g) * D + d] * red_w[w * GT + g];
    const int64_t bh = int64_t(b) * p.num_q_heads + h0 + g;
    if (direct) p.out[bh * D + d] = from_float<T>(o);
    else p.part_out[(bh * p.splits + split) * D + d] = o;
  }
}

}  // namespace splitvl::cuda
