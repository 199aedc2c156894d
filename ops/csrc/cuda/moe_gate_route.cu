// moe_gate_route: the MoE router linear and moe_route in one launch at decode (semantics:
// ops/reference_moe.py). The router weight is small (E x H, 512 KB at 30B-A3B) and T few, so
// the two launches it replaces were latency-bound.
//
// Every CTA takes kGateWarps router rows, one warp each, and reads each row once for all T
// tokens (fp32 sums), writing the logits to an fp32 workspace. The last CTA to finish (a
// threadfence, then an atomic ticket on `arrivals`, which that CTA resets to 0 so a CUDA graph
// replays the op without a memset) reads every logit back and runs moe_route's top-k and the
// pair alignment (moe_align_common.cuh) in that one CTA.
//
// Launched with PDL (pdl.cuh): each lane loads its first weight packs into registers before
// pdl_wait (parameters no kernel writes), so the weight read overlaps the previous kernel's
// tail; x, the logits and every output are touched only after the wait, with coherent loads.
#include <ATen/ops/linear.h>

#include "common.cuh"
#include "moe_align_common.cuh"
#include "ops.cuh"
#include "pdl.cuh"
#include "topk_common.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kGateWarps = 4;  // router rows per CTA: 32 CTAs for E = 128
constexpr int kGateThreads = kGateWarps * 32;
constexpr int kGateMaxTokens = 16;  // decode steps; larger T runs the linear, then moe_route
constexpr int kGateMaxExperts = 512;  // moe_route's one-CTA limit (VPT 32 spills)
constexpr int kGateCache = 8;  // weight packs per lane read before the wait (a 2,048-wide bf16 row)

template <typename T>
struct GateRouteArgs {
  const T* x;  // [T, H], rows x_stride apart
  const T* weight;  // [E, H]
  float* logits;  // [T, E] workspace
  int* arrivals;  // persistent counter, 0 between launches
  float* topk_weights;
  int32_t* topk_ids;
  int32_t *sorted, *pos, *block_experts, *total;
  int64_t x_stride;
  int tokens, hidden, experts, k, block, blocks;
  bool renormalize;
};

// acc[t] += dot(weight pack i, x[t] pack i) for each token t.
template <typename T, int VEC>
__device__ __forceinline__ void dot_pack(const GateRouteArgs<T>& a, const Pack<T, VEC>& w, int i,
                                         float (&acc)[kGateMaxTokens]) {
#pragma unroll
  for (int t = 0; t < kGateMaxTokens; ++t) {
    if (t < a.tokens) {
      const Pack<T, VEC> x = reinterpret_cast<const Pack<T, VEC>*>(a.x + t * a.x_stride)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[t] += to_float(w.v[j]) * to_float(x.v[j]);
    }
  }
}

// This warp's router row e for every token into logits[:, e].
template <typename T, int VEC>
__device__ void router_row(const GateRouteArgs<T>& a, int e) {
  using P = Pack<T, VEC>;
  const int lane = threadIdx.x & 31;
  const int packs = a.hidden / VEC;
  const P* w = reinterpret_cast<const P*>(a.weight + int64_t(e) * a.hidden);
  P cache[kGateCache];
#pragma unroll
  for (int c = 0; c < kGateCache; ++c)
    if (lane + 32 * c < packs) cache[c] = w[lane + 32 * c];
  pdl_wait();  // x comes from the previous kernel (pdl.cuh)
  pdl_launch_dependents();
  float acc[kGateMaxTokens] = {};
#pragma unroll
  for (int c = 0; c < kGateCache; ++c)
    if (lane + 32 * c < packs) dot_pack<T, VEC>(a, cache[c], lane + 32 * c, acc);
  for (int i = lane + 32 * kGateCache; i < packs; i += 32) dot_pack<T, VEC>(a, w[i], i, acc);
#pragma unroll
  for (int t = 0; t < kGateMaxTokens; ++t) {
    if (t < a.tokens) {
      const float logit = warp_sum(acc[t]);
      if (lane == 0) a.logits[t * a.experts + e] = logit;
    }
  }
}

// Whether this CTA is the last of the grid to finish its logits; the last one resets the counter.
__device__ bool arrived_last(int* arrivals) {
  __shared__ bool last;
  __threadfence();  // this CTA's logits are visible device-wide before it counts itself
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(arrivals, 1) == int(gridDim.x) - 1;
    if (last) atomicExch(arrivals, 0);  // every other CTA has counted: ready for the next launch
  }
  __syncthreads();
  return last;
}

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kGateThreads) moe_gate_route_kernel(GateRouteArgs<T> a) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int e = blockIdx.x * kGateWarps + warp;
  if (e < a.experts) {
    router_row<T, VEC>(a, e);
  } else {
    pdl_wait();  // the counter and the outputs are written after the previous kernel only
    pdl_launch_dependents();
  }
  if (!arrived_last(a.arrivals)) return;
  __threadfence();
  float* logits = smem;  // [T, E]
  int* picked = reinterpret_cast<int*>(logits + a.tokens * a.experts);  // [T, k]
  for (int i = threadIdx.x; i < a.tokens * a.experts; i += kGateThreads)
    logits[i] = __ldcg(a.logits + i);  // other CTAs' writes: through L2, never a stale L1 line
  __syncthreads();
  for (int t = warp; t < a.tokens; t += kGateWarps) {
    const TopkPick pick = topk_row<float, VPT>(logits + t * a.experts, a.experts, a.k, a.renormalize);
    if (lane < a.k) {
      a.topk_weights[t * a.k + lane] = pick.weight;
      a.topk_ids[t * a.k + lane] = pick.id;
      picked[t * a.k + lane] = pick.id;
    }
  }
  __syncthreads();
  align_pairs<kGateThreads>(picked, a.tokens * a.k, a.experts, a.block, a.blocks,
                            picked + a.tokens * a.k, a.sorted, a.pos, a.block_experts, a.total);
}

void check_gate_args(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& logits,
                     const at::Tensor& arrivals, const char* op) {
  check_cuda_tensors(op, "x", x, gate_weight, logits, arrivals);
  SPLITVL_CHECK(x.dim() == 2 && gate_weight.dim() == 2 && gate_weight.size(1) == x.size(1) &&
                    gate_weight.scalar_type() == x.scalar_type(),
                op, ": x [T, H] and gate_weight [E, H] of one dtype expected, got ", x.sizes(),
                " and ", gate_weight.sizes());
  SPLITVL_CHECK(x.stride(1) == 1 && gate_weight.is_contiguous(), op,
                ": x needs unit stride over H, gate_weight must be contiguous");
  SPLITVL_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                    logits.sizes() == at::IntArrayRef({x.size(0), gate_weight.size(0)}),
                op, ": logits must be contiguous fp32 [T, E], got ", logits.sizes());
  SPLITVL_CHECK(arrivals.scalar_type() == at::kInt && arrivals.numel() == 1, op,
                ": arrivals must be one int32");
}

}  // namespace

void moe_gate_route(at::Tensor& topk_weights, at::Tensor& topk_ids, at::Tensor& sorted_pairs,
                    at::Tensor& pair_pos, at::Tensor& block_experts, at::Tensor& total_padded,
                    at::Tensor& logits, at::Tensor& arrivals, const at::Tensor& x,
                    const at::Tensor& gate_weight, bool renormalize) {
  constexpr const char* op = "moe_gate_route";
  check_gate_args(x, gate_weight, logits, arrivals, op);
  check_topk_args(topk_weights, topk_ids, logits, op);
  const int64_t tokens = x.size(0), experts = gate_weight.size(0), hidden = x.size(1);
  const int block = check_align_args(sorted_pairs, pair_pos, block_experts, total_padded,
                                     topk_ids, experts, op);
  if (tokens == 0 || tokens > kGateMaxTokens || experts > kGateMaxExperts || hidden == 0) {
    logits.copy_(at::linear(x.to(at::kFloat), gate_weight.to(at::kFloat)));
    moe_route(topk_weights, topk_ids, sorted_pairs, pair_pos, block_experts, total_padded, logits,
              renormalize);
    return;
  }
  const int64_t k = topk_weights.size(1);
  const size_t smem = sizeof(float) * size_t(tokens * experts) +
                      sizeof(int) * size_t(tokens * k + experts * (2 + kGateWarps));
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    using T = scalar_t;
    const GateRouteArgs<T> a{
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(gate_weight.data_ptr()),
        logits.data_ptr<float>(), arrivals.data_ptr<int>(), topk_weights.data_ptr<float>(),
        topk_ids.data_ptr<int32_t>(), sorted_pairs.data_ptr<int32_t>(), pair_pos.data_ptr<int32_t>(),
        block_experts.data_ptr<int32_t>(), total_padded.data_ptr<int32_t>(), x.stride(0),
        static_cast<int>(tokens), static_cast<int>(hidden), static_cast<int>(experts),
        static_cast<int>(k), block, static_cast<int>(block_experts.numel()), renormalize};
    constexpr int V = kPack16<T>;
    const bool vec = hidden % V == 0 && x.stride(0) % V == 0 && is_aligned16(a.x) &&
                     is_aligned16(a.weight);
    const unsigned grid = ceil_div(experts, kGateWarps);
    dispatch_topk_vpt(static_cast<int>(experts), [&](auto vpt) {
      constexpr int VPT = decltype(vpt)::value;
      auto kernel = vec ? moe_gate_route_kernel<T, V, VPT> : moe_gate_route_kernel<T, 1, VPT>;
      allow_smem(kernel, smem);
      launch_pdl(kernel, grid, kGateThreads, smem, stream, a);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
