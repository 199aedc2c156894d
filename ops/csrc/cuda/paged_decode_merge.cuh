// The merge of paged_attention_decode's context partitions. Each used partition leaves, per query
// head, its max (base 2) in part_max, its sum in part_sum and its normalised output in part_out;
// the output is their average weighted by sum * exp2(max - overall max). Two ways, picked per
// call on the host (decode_merge.h, SPLITVL_DECODE_FUSED_MERGE):
//
// - Fused (one launch): the decode CTAs of a (sequence, head group) draw tickets after leaving
//   their partition; the CTA that draws a chunk's last ticket merges the chunk's partitions
//   into the slot of its first one, and the one that completes the last chunk merges the chunks
//   into out. Chunks (about sqrt(splits) partitions, host's pick_merge_chunk) keep the serial
//   tail of the grid to two short merges instead of one CTA reading every partition. The
//   counters live in a buffer the host keeps per device (merge_tickets in paged_attention.cu):
//   zero before a launch, and the CTA that draws a counter's last ticket zeroes it again, so a
//   CUDA-graph replay needs no memset. Partitions past seq_len do not draw tickets: every CTA
//   computes the expected counts from seq_len alike. The result does not depend on which CTA
//   merges: the partitions are read in a fixed order.
// - paged_decode_merge_kernel: a second launch, grid (Hq, B).
#pragma once

#include "paged_decode_common.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {

constexpr int kMergeThreads = 256;
constexpr int kMergeLoads = 8;  // partitions whose loads a thread of the merge kernel issues at once

// Folds one partition (its max pm, base 2, sum ps and normalised output pv) into a running
// (max m, sum l, weighted output o), the online softmax's step.
__device__ __forceinline__ void fold_partition(float& m, float& l, float4& o, float pm, float ps, const float4& pv) {
  const float mx = fmaxf(m, pm);
  const float a = exp2f(m - mx), w = ps * exp2f(pm - mx);
  m = mx;
  l = l * a + w;
  o.x = o.x * a + w * pv.x;
  o.y = o.y * a + w * pv.y;
  o.z = o.z * a + w * pv.z;
  o.w = o.w * a + w * pv.w;
}

// Merges `groups` running (max, sum, output) triples held in shared memory at r0, r0 + step, ...:
// returns the unnormalised output and sets the overall max `mx` and sum `total`.
__device__ __forceinline__ float4 merge_groups(const float4* red_o, const float* red_m, const float* red_l, int r0,
                                               int step, int groups, float& mx, float& total) {
  mx = -INFINITY;
  for (int k = 0; k < groups; ++k) mx = fmaxf(mx, red_m[r0 + k * step]);
  const float ms = mx == -INFINITY ? 0.f : mx;
  total = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < groups; ++k) {
    const int i = r0 + k * step;
    const float w = exp2f(red_m[i] - ms);
    total += red_l[i] * w;
    acc.x += red_o[i].x * w;
    acc.y += red_o[i].y * w;
    acc.z += red_o[i].z * w;
    acc.w += red_o[i].w * w;
  }
  return acc;
}

// Column d4 (4 values) of a head's output row: acc * inv in T.
template <typename T>
__device__ __forceinline__ void store_output(T* row, int d4, const float4& acc, float inv) {
  Pack<T, 4> out;
  out.v[0] = from_float<T>(acc.x * inv);
  out.v[1] = from_float<T>(acc.y * inv);
  out.v[2] = from_float<T>(acc.z * inv);
  out.v[3] = from_float<T>(acc.w * inv);
  reinterpret_cast<Pack<T, 4>*>(row)[d4] = out;
}

// Partitions of the context that sequence b uses (0 for an empty one; at most splits, so that
// a length past the table cannot leave a ticket counter short of its count).
template <typename T>
__device__ __forceinline__ int used_partitions(const DecodeParams<T>& p, int seq_len) {
  return min((seq_len + p.part - 1) / p.part, p.splits);
}

// grid (Hq, B): merge the used partitions of one (sequence, head). Thread (group,
// d4) folds partitions group, group + groups, ... into its own (max, sum, output
// float4) with loads issued before use and independent of seq_len (the unused
// partitions are masked after loading); the groups then merge in shared memory.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) paged_decode_merge_kernel(DecodeParams<T> p) {
  __shared__ float4 red_o[kMergeThreads];
  __shared__ float red_m[kMergeThreads], red_l[kMergeThreads];
  constexpr int S = kMergeLoads;
  const int h = blockIdx.x, b = blockIdx.y, D4 = p.head_dim / 4;
  pdl_wait();  // the partitions come from the decode kernel (pdl.cuh)
  pdl_launch_dependents();
  const int groups = kMergeThreads / D4, group = threadIdx.x / D4, d4 = threadIdx.x - group * D4;
  const int used = (max(p.seq_lens[b], 0) + p.part - 1) / p.part;
  const int64_t bh = int64_t(b) * p.num_q_heads + h;
  const float4* po = reinterpret_cast<const float4*>(p.part_out + bh * p.splits * p.head_dim);
  float m = -INFINITY, l = 0.f;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  if (group < groups) {
    // The first S partitions of the group load before seq_len is known.
    int s0 = group;
    do {
      float pm[S], ps[S];
      float4 pv[S];
#pragma unroll
      for (int k = 0; k < S; ++k) {
        const int s = min(s0 + k * groups, p.splits - 1);
        pm[k] = p.part_max[bh * p.splits + s];
        ps[k] = p.part_sum[bh * p.splits + s];
        pv[k] = po[s * D4 + d4];
      }
#pragma unroll
      for (int k = 0; k < S; ++k) {
        if (s0 + k * groups >= used) break;
        fold_partition(m, l, o, pm[k], ps[k], pv[k]);
      }
    } while ((s0 += S * groups) < used);
  }
  red_o[threadIdx.x] = o;
  red_m[threadIdx.x] = m;
  red_l[threadIdx.x] = l;
  __syncthreads();
  if (threadIdx.x >= D4) return;
  float mx, total;
  const float4 acc = merge_groups(red_o, red_m, red_l, d4, D4, groups, mx, total);
  store_output(p.out + bh * p.head_dim, d4, acc, total > 0.f ? 1.f / total : 0.f);
}

// Whether this CTA draws the last of `expected` tickets of `counter` (the same answer in every
// thread). The barrier orders every thread's earlier global writes before thread 0's fence and
// ticket (release, cumulative over the CTA, as in cooperative groups' grid sync); the last CTA's
// fence after its ticket orders the other CTAs' writes before its own loads (acquire), which
// must read L2 (__ldcg: never a stale L1 line). The last CTA zeroes the counter: no CTA of this
// launch draws from it again, and the next launch reads it only after this grid completed
// (stream order; with PDL, after its griddepcontrol.wait).
__device__ __forceinline__ bool draw_last_ticket(int* counter, int expected) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const bool is_last = atomicAdd(counter, 1) == expected - 1;
    if (is_last) {
      atomicExch(counter, 0);
      __threadfence();
    }
    last = is_last;
  }
  __syncthreads();
  return last != 0;
}

// Merges partitions first, first + stride, ... (count of them, count >= 1) of heads
// [h0, h0 + heads) of sequence b, reading them through L2, and writes the result to out
// (`final`) or, as a partition of its own, to slot `first` (read already: the writes follow a
// barrier, and a head's max and sum are written by its last column's thread, after every
// iteration that reads them). The CTA's threads take one (head, float4 column) item each, in
// turns when the items are more; when they are fewer, `groups` threads share an item, each
// folding every groups-th partition, and merge through shared memory like the merge kernel.
// A thread issues the loads of S partitions at once.
template <int S, typename T>
__device__ void merge_partitions(const DecodeParams<T>& p, int b, int h0, int heads, int first, int count,
                                 int stride, bool final) {
  __shared__ float4 red_o[kDecodeThreads];
  __shared__ float red_m[kDecodeThreads], red_l[kDecodeThreads];
  const int D4 = p.head_dim / 4, items = heads * D4;
  const int groups = max(1, kDecodeThreads / items), slots = groups * items;
  const int64_t bh0 = int64_t(b) * p.num_q_heads + h0;
  for (int v0 = 0; v0 < slots; v0 += kDecodeThreads) {  // block-uniform: barriers inside
    const int v = v0 + int(threadIdx.x);
    const int group = v / items, item = v - group * items;
    const int g = item / D4, d4 = item - g * D4;
    const int64_t bh = bh0 + g;
    float m = -INFINITY, l = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    if (v < slots) {
      const float* pmax = p.part_max + bh * p.splits;
      const float* psum = p.part_sum + bh * p.splits;
      const float4* po = reinterpret_cast<const float4*>(p.part_out + bh * p.splits * p.head_dim) + d4;
      for (int j0 = group; j0 < count; j0 += S * groups) {
        float pm[S], ps[S];
        float4 pv[S];
#pragma unroll
        for (int k = 0; k < S; ++k) {
          const int s = first + min(j0 + k * groups, count - 1) * stride;
          pm[k] = __ldcg(pmax + s);
          ps[k] = __ldcg(psum + s);
          pv[k] = __ldcg(po + int64_t(s) * D4);
        }
#pragma unroll
        for (int k = 0; k < S; ++k) {
          if (j0 + k * groups >= count) break;
          fold_partition(m, l, o, pm[k], ps[k], pv[k]);
        }
      }
    }
    red_o[threadIdx.x] = o;
    red_m[threadIdx.x] = m;
    red_l[threadIdx.x] = l;
    __syncthreads();
    if (v < items) {  // group 0 (v == item): merge the groups of its item
      const int r0 = item - v0;
      float mx, total;
      const float4 acc = merge_groups(red_o, red_m, red_l, r0, items, groups, mx, total);
      const float inv = total > 0.f ? 1.f / total : 0.f;
      if (final) {
        store_output(p.out + bh * p.head_dim, d4, acc, inv);
      } else {
        const int64_t slot = bh * p.splits + first;
        reinterpret_cast<float4*>(p.part_out + slot * p.head_dim)[d4] =
            make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
        if (d4 == D4 - 1) {
          p.part_max[slot] = mx;
          p.part_sum[slot] = total;
        }
      }
    }
    __syncthreads();  // red_* are rewritten by the next turn
  }
}

// Called by every thread of a decode CTA of GT heads after it left the partial result of partition
// `split` (of `used`) for heads [h0, h0 + heads) of sequence b: the fused merge (header comment).
// Kernels of 8 heads have the registers (launch bounds) for 16 partitions' loads at once.
template <int GT, typename T>
__device__ __forceinline__ void merge_if_last(const DecodeParams<T>& p, int b, int h0, int heads, int split,
                                              int used) {
  int* tickets = p.merge_tickets + (int64_t(b) * gridDim.x + blockIdx.x) * (1 + p.merge_chunks);
  const int chunk_len = p.merge_chunk, chunk = split / chunk_len;
  const int chunks = (used + chunk_len - 1) / chunk_len, first = chunk * chunk_len;
  if (!draw_last_ticket(tickets + 1 + chunk, min(chunk_len, used - first))) return;
  constexpr int S = GT >= 8 ? 16 : kMergeLoads;
  merge_partitions<S>(p, b, h0, heads, first, min(chunk_len, used - first), 1, chunks == 1);
  if (chunks == 1 || !draw_last_ticket(tickets, chunks)) return;
  merge_partitions<S>(p, b, h0, heads, 0, chunks, chunk_len, true);
}

}  // namespace splitvl::cuda
