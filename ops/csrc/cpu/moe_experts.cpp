// MoE expert ops on the CPU: pair alignment (alone, or after the router's top-k:
// moe_route), the unpadded permutation of a grouped GEMM (moe_permute), grouped gate_up (SiLU-and-mul) and
// down GEMMs over expert runs, and the weighted combine. Semantics:
// ops/reference_moe.py. The GEMMs are one at::matmul per expert run, which is
// what CI's tiny models need.
#include <ATen/ops/matmul.h>

#include <utility>
#include <vector>

#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

// The expert blocks in use, merged into runs of consecutive blocks of one expert.
struct ExpertRun {
  int64_t expert, first_row, real_rows;
};

std::vector<ExpertRun> expert_runs(const at::Tensor& sorted_pairs, const at::Tensor& block_experts,
                                   const at::Tensor& total_padded, int64_t pairs, const char* op) {
  SPLITVL_CHECK_CPU(sorted_pairs);
  SPLITVL_CHECK_CPU(block_experts);
  SPLITVL_CHECK_CPU(total_padded);
  SPLITVL_CHECK_DTYPE(sorted_pairs, at::kInt);
  SPLITVL_CHECK_DTYPE(block_experts, at::kInt);
  SPLITVL_CHECK_DTYPE(total_padded, at::kInt);
  SPLITVL_CHECK_CONTIG(sorted_pairs);
  SPLITVL_CHECK_CONTIG(block_experts);
  const int64_t capacity = sorted_pairs.numel(), blocks = block_experts.numel();
  SPLITVL_CHECK(blocks > 0 ? capacity % blocks == 0 : capacity == 0, op, ": sorted_pairs [",
                capacity, "] must hold a whole number of the ", blocks, " blocks");
  SPLITVL_CHECK(total_padded.numel() == 1, op, ": total_padded must hold one value");
  std::vector<ExpertRun> runs;
  if (blocks == 0) return runs;
  const int64_t block = capacity / blocks;
  const int64_t used = std::min<int64_t>(total_padded.item<int32_t>() / block, blocks);
  const int32_t* ids = block_experts.const_data_ptr<int32_t>();
  const int32_t* sorted = sorted_pairs.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < used; ++b) {
    if (ids[b] < 0) continue;
    if (runs.empty() || runs.back().expert != ids[b] ||
        runs.back().first_row + runs.back().real_rows != b * block) {
      runs.push_back({ids[b], b * block, 0});
    }
    for (int64_t r = b * block; r < (b + 1) * block && sorted[r] < pairs; ++r) ++runs.back().real_rows;
  }
  return runs;
}

}  // namespace

void moe_align(at::Tensor& sorted_pairs, at::Tensor& pair_pos, at::Tensor& block_experts,
               at::Tensor& total_padded, const at::Tensor& topk_ids, int64_t num_experts) {
  SPLITVL_CHECK_CPU(topk_ids);
  SPLITVL_CHECK_CPU(pair_pos);
  SPLITVL_CHECK_DTYPE(topk_ids, at::kInt);
  SPLITVL_CHECK_DTYPE(pair_pos, at::kInt);
  SPLITVL_CHECK_CONTIG(topk_ids);
  SPLITVL_CHECK_CONTIG(pair_pos);
  SPLITVL_CHECK(pair_pos.numel() == topk_ids.numel(), "moe_align: pair_pos must have ",
                topk_ids.numel(), " elements, got ", pair_pos.numel());
  const int64_t pairs = topk_ids.numel();
  // Checks the outputs' dtypes and block layout; no runs exist yet (total is rewritten below).
  total_padded.fill_(0);
  expert_runs(sorted_pairs, block_experts, total_padded, pairs, "moe_align");
  const int64_t capacity = sorted_pairs.numel(), blocks = block_experts.numel();
  const int64_t block = blocks > 0 ? capacity / blocks : 1;
  const int32_t* ids = topk_ids.const_data_ptr<int32_t>();
  std::vector<int64_t> counts(num_experts, 0), cursor(num_experts, 0);
  for (int64_t p = 0; p < pairs; ++p)
    if (ids[p] >= 0 && ids[p] < num_experts) ++counts[ids[p]];
  int32_t* sorted = sorted_pairs.data_ptr<int32_t>();
  int32_t* owner = block_experts.data_ptr<int32_t>();
  std::fill(sorted, sorted + capacity, static_cast<int32_t>(pairs));
  std::fill(owner, owner + blocks, -1);
  int64_t row = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    cursor[e] = row;
    const int64_t padded = (counts[e] + block - 1) / block * block;
    SPLITVL_CHECK(row + padded <= capacity, "moe_align: capacity ", capacity, " too small");
    std::fill(owner + row / block, owner + (row + padded) / block, static_cast<int32_t>(e));
    row += padded;
  }
  int32_t* pos = pair_pos.data_ptr<int32_t>();
  for (int64_t p = 0; p < pairs; ++p) {
    const bool routed = ids[p] >= 0 && ids[p] < num_experts;
    pos[p] = routed ? static_cast<int32_t>(cursor[ids[p]]++) : -1;
    if (routed) sorted[pos[p]] = static_cast<int32_t>(p);
  }
  total_padded.fill_(row);
}

void moe_permute(at::Tensor& row_tokens, at::Tensor& pair_pos, at::Tensor& expert_offsets,
                 const at::Tensor& topk_ids, int64_t num_experts) {
  const std::pair<const at::Tensor*, const char*> ints[] = {
      {&row_tokens, "row_tokens"}, {&pair_pos, "pair_pos"}, {&expert_offsets, "expert_offsets"},
      {&topk_ids, "topk_ids"}};
  for (const auto& [t, name] : ints)
    SPLITVL_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->is_contiguous(),
                  "moe_permute: ", name, " must be a contiguous int32 CPU tensor");
  SPLITVL_CHECK(topk_ids.dim() == 2, "moe_permute: topk_ids must be [T, k], got ", topk_ids.sizes());
  const int64_t pairs = topk_ids.numel(), k = topk_ids.size(1);
  SPLITVL_CHECK(num_experts >= 1 && row_tokens.numel() == pairs && pair_pos.numel() == pairs &&
                    expert_offsets.numel() == num_experts,
                "moe_permute: row_tokens and pair_pos must have ", pairs,
                " elements and expert_offsets E=", num_experts, ", got ", row_tokens.numel(), ", ",
                pair_pos.numel(), ", ", expert_offsets.numel());
  const int32_t* ids = topk_ids.const_data_ptr<int32_t>();
  std::vector<int64_t> cursor(num_experts, 0);
  for (int64_t p = 0; p < pairs; ++p)
    if (ids[p] >= 0 && ids[p] < num_experts) ++cursor[ids[p]];
  int32_t* offsets = expert_offsets.data_ptr<int32_t>();
  int64_t row = 0;
  for (int64_t e = 0; e < num_experts; ++e) {  // cursor: counts -> first row of each expert
    const int64_t count = cursor[e];
    cursor[e] = row;
    row += count;
    offsets[e] = static_cast<int32_t>(row);
  }
  int32_t* tokens = row_tokens.data_ptr<int32_t>();
  int32_t* pos = pair_pos.data_ptr<int32_t>();
  std::fill(tokens + row, tokens + pairs, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    const bool routed = ids[p] >= 0 && ids[p] < num_experts;
    pos[p] = routed ? static_cast<int32_t>(cursor[ids[p]]++) : -1;
    if (routed) tokens[pos[p]] = static_cast<int32_t>(p / k);
  }
}

void moe_route(at::Tensor& topk_weights, at::Tensor& topk_ids, at::Tensor& sorted_pairs,
               at::Tensor& pair_pos, at::Tensor& block_experts, at::Tensor& total_padded,
               const at::Tensor& gating_output, bool renormalize) {
  topk_softmax(topk_weights, topk_ids, gating_output, renormalize);
  moe_align(sorted_pairs, pair_pos, block_experts, total_padded, topk_ids,
            gating_output.size(1));
}

void moe_gate_up(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                 const at::Tensor& sorted_pairs, const at::Tensor& block_experts,
                 const at::Tensor& total_padded, int64_t top_k) {
  SPLITVL_CHECK_CPU(x);
  SPLITVL_CHECK_CPU(weight);
  SPLITVL_CHECK_CPU(out);
  SPLITVL_CHECK(x.dim() == 2 && weight.dim() == 3 && weight.size(2) == x.size(1) &&
                    weight.size(1) % 2 == 0,
                "moe_gate_up: x [T, H] and weight [E, 2I, H] expected, got ", x.sizes(), " and ",
                weight.sizes());
  const int64_t inter = weight.size(1) / 2;
  SPLITVL_CHECK(out.dim() == 2 && out.size(0) == sorted_pairs.numel() && out.size(1) == inter,
                "moe_gate_up: out must be [capacity, I=", inter, "], got ", out.sizes());
  SPLITVL_CHECK(top_k >= 1, "moe_gate_up: top_k must be >= 1");
  const int64_t pairs = x.size(0) * top_k;
  const auto runs = expert_runs(sorted_pairs, block_experts, total_padded, pairs, "moe_gate_up");
  for (const ExpertRun& run : runs) {
    const at::Tensor rows = sorted_pairs.narrow(0, run.first_row, run.real_rows).div(
        top_k, "floor").to(at::kLong);
    const at::Tensor gate_up = at::matmul(x.index_select(0, rows), weight[run.expert].t()).to(at::kFloat);
    const at::Tensor h = at::silu(gate_up.narrow(1, 0, inter)) * gate_up.narrow(1, inter, inter);
    out.narrow(0, run.first_row, run.real_rows).copy_(h);
  }
}

void moe_down(at::Tensor& out, const at::Tensor& h, const at::Tensor& weight,
              const at::Tensor& topk_weights, const at::Tensor& sorted_pairs,
              const at::Tensor& block_experts, const at::Tensor& total_padded) {
  SPLITVL_CHECK_CPU(h);
  SPLITVL_CHECK_CPU(weight);
  SPLITVL_CHECK_CPU(out);
  SPLITVL_CHECK_CPU(topk_weights);
  SPLITVL_CHECK_DTYPE(topk_weights, at::kFloat);
  SPLITVL_CHECK(h.dim() == 2 && weight.dim() == 3 && weight.size(2) == h.size(1) &&
                    h.size(0) == sorted_pairs.numel(),
                "moe_down: h [capacity, I] and weight [E, H, I] expected, got ", h.sizes(), " and ",
                weight.sizes());
  SPLITVL_CHECK(out.dim() == 2 && out.size(0) == h.size(0) && out.size(1) == weight.size(1),
                "moe_down: out must be [capacity, H=", weight.size(1), "], got ", out.sizes());
  const at::Tensor flat_weights = topk_weights.reshape({-1});
  const auto runs = expert_runs(sorted_pairs, block_experts, total_padded, flat_weights.numel(),
                                "moe_down");
  for (const ExpertRun& run : runs) {
    const at::Tensor pairs = sorted_pairs.narrow(0, run.first_row, run.real_rows).to(at::kLong);
    const at::Tensor y = at::matmul(h.narrow(0, run.first_row, run.real_rows), weight[run.expert].t());
    out.narrow(0, run.first_row, run.real_rows)
        .copy_(y.to(at::kFloat) * flat_weights.index_select(0, pairs).unsqueeze(1));
  }
}

void moe_combine(at::Tensor& out, const at::Tensor& y, const at::Tensor& pair_pos,
                 const std::optional<at::Tensor>& topk_weights) {
  SPLITVL_CHECK_CPU(out);
  SPLITVL_CHECK_CPU(y);
  SPLITVL_CHECK_CPU(pair_pos);
  SPLITVL_CHECK_DTYPE(pair_pos, at::kInt);
  SPLITVL_CHECK_CONTIG(out);
  SPLITVL_CHECK(pair_pos.dim() == 2 && y.dim() == 2 && out.dim() == 2 &&
                    out.size(0) == pair_pos.size(0) && out.size(1) == y.size(1),
                "moe_combine: out [T, H], y [capacity, H], pair_pos [T, k] expected, got ",
                out.sizes(), ", ", y.sizes(), ", ", pair_pos.sizes());
  const at::Tensor pos = pair_pos.to(at::kLong);
  const at::Tensor rows = y.index_select(0, pos.clamp_min(0).flatten()).to(at::kFloat);
  at::Tensor scale = pos.ge(0).to(at::kFloat);
  if (topk_weights.has_value()) {
    SPLITVL_CHECK_CPU((*topk_weights));
    SPLITVL_CHECK(topk_weights->sizes() == pair_pos.sizes() && topk_weights->scalar_type() == at::kFloat,
                  "moe_combine: topk_weights must be fp32 ", pair_pos.sizes(), ", got ",
                  topk_weights->sizes());
    scale = scale * *topk_weights;
  }
  out.copy_((rows.view({pos.size(0), pos.size(1), y.size(1)}) * scale.unsqueeze(-1)).sum(1));
}

}  // namespace splitvl::cpu
