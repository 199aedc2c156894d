// MoE router: fp32 softmax over experts, top-k (ties: lower index first),
// optional renormalisation of the k weights (Qwen norm_topk_prob).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {

void topk_softmax(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& gating_output,
                  bool renormalize) {
  SPLITVL_CHECK_CPU(gating_output);
  SPLITVL_CHECK_CPU(topk_weights);
  SPLITVL_CHECK_CPU(topk_ids);
  SPLITVL_CHECK_FLOAT_DTYPE(gating_output);
  SPLITVL_CHECK(gating_output.dim() == 2 && gating_output.stride(1) == 1,
              "topk_softmax: gating_output must be [T, E] with unit last stride, got ",
              gating_output.sizes());
  SPLITVL_CHECK_DTYPE(topk_weights, at::kFloat);
  SPLITVL_CHECK_DTYPE(topk_ids, at::kInt);
  SPLITVL_CHECK_CONTIG(topk_weights);
  SPLITVL_CHECK_CONTIG(topk_ids);
  const int64_t tokens = gating_output.size(0), experts = gating_output.size(1);
  SPLITVL_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == tokens &&
                  topk_ids.sizes() == topk_weights.sizes(),
              "topk_softmax: topk_weights ", topk_weights.sizes(), " and topk_ids ",
              topk_ids.sizes(), " must both be [T=", tokens, ", k]");
  const int64_t k = topk_weights.size(1);
  SPLITVL_CHECK(k >= 1 && k <= experts, "topk_softmax: k=", k, " must be in [1, E=", experts, "]");
  if (tokens == 0) return;
  SPLITVL_DISPATCH_FLOATING(gating_output.scalar_type(), "splitvl_topk_softmax", [&] {
    const scalar_t* logits = gating_output.const_data_ptr<scalar_t>();
    float* weights = topk_weights.data_ptr<float>();
    int32_t* ids = topk_ids.data_ptr<int32_t>();
    const int64_t row_stride = gating_output.stride(0);
    at::parallel_for(0, tokens, grain_for(experts * 4), [&](int64_t b, int64_t e) {
      std::vector<float> probs(experts);
      std::vector<int32_t> order(experts);
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* x = logits + t * row_stride;
        float max = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < experts; ++i) max = std::max(max, static_cast<float>(x[i]));
        float sum = 0.f;
        for (int64_t i = 0; i < experts; ++i) {
          probs[i] = std::exp(static_cast<float>(x[i]) - max);
          sum += probs[i];
        }
        for (int64_t i = 0; i < experts; ++i) probs[i] /= sum;
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t c) {
          return probs[a] > probs[c] || (probs[a] == probs[c] && a < c);
        });
        float picked = 0.f;
        for (int64_t j = 0; j < k; ++j) picked += probs[order[j]];
        const float norm = renormalize ? 1.f / picked : 1.f;
        for (int64_t j = 0; j < k; ++j) {
          weights[t * k + j] = probs[order[j]] * norm;
          ids[t * k + j] = order[j];
        }
      }
    });
  });
}

}  // namespace splitvl::cpu
