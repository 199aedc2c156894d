// The MoE router's per-token top-k (fp32 softmax over experts, top-k, ties: lower
// index), shared by topk_softmax.cu and the fused router + alignment (moe_align.cu).
#pragma once

#include "common.cuh"

namespace splitvl::cuda {

constexpr float kTopkTaken = -2.f;  // below any probability

struct TopkPick {
  float weight;  // lane j < k: the j-th pick (renormalised if asked)
  int id;
};

// One warp ranks one token's row g [E] (unit stride); lane j < k gets the j-th pick.
// Each lane keeps E / 32 probabilities in registers; each of the k rounds is a warp arg-max.
template <typename T, int VPT>
__device__ __forceinline__ TopkPick topk_row(const T* g, int experts, int k, bool renormalize) {
  const int lane = threadIdx.x & 31;
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
  for (int j = 0; j < VPT; ++j) p[j] = lane + 32 * j < experts ? p[j] / sum : kTopkTaken;

  TopkPick mine{0.f, 0};
  float picked = 0.f;
  for (int r = 0; r < k; ++r) {
    float best = kTopkTaken;
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
      if (lane + 32 * j == best_id) p[j] = kTopkTaken;
    if (lane == r) mine = {best, best_id};
    picked += best;
  }
  if (renormalize) mine.weight /= picked;
  return mine;
}

// Calls launch(std::integral_constant<int, VPT>{}) with the smallest VPT >= E / 32 (E <= 1024).
template <typename Launch>
void dispatch_topk_vpt(int experts, Launch&& launch) {
  if (experts <= 32) launch(std::integral_constant<int, 1>{});
  else if (experts <= 64) launch(std::integral_constant<int, 2>{});
  else if (experts <= 128) launch(std::integral_constant<int, 4>{});
  else if (experts <= 256) launch(std::integral_constant<int, 8>{});
  else if (experts <= 512) launch(std::integral_constant<int, 16>{});
  else launch(std::integral_constant<int, 32>{});
}

// The checks of topk_softmax's arguments (shared with moe_route).
inline void check_topk_args(const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                            const at::Tensor& gating_output, const char* op) {
  check_cuda_tensors(op, "gating_output", gating_output, topk_weights, topk_ids);
  SPLITVL_CHECK(gating_output.dim() == 2, op, ": gating_output must be [T, E], got ",
                gating_output.sizes());
  const int64_t T = gating_output.size(0), E = gating_output.size(1);
  SPLITVL_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == T &&
                    topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
                op, ": topk_weights must be contiguous fp32 [T, k]");
  SPLITVL_CHECK(topk_ids.sizes() == topk_weights.sizes() && topk_ids.scalar_type() == at::kInt &&
                    topk_ids.is_contiguous(),
                op, ": topk_ids must be contiguous int32 with topk_weights' shape");
  const int64_t k = topk_weights.size(1);
  SPLITVL_CHECK(k >= 1 && k <= 32 && k <= E, op, ": topk ", k, " must be in [1, min(32, E=", E,
                ")]");
  SPLITVL_CHECK(E <= 1024, op, ": at most 1024 experts, got ", E);
  SPLITVL_CHECK(gating_output.stride(1) == 1, op, ": gating_output needs unit stride over experts");
}

}  // namespace splitvl::cuda
