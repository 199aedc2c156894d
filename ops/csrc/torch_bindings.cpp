// The splitvl op library: one schema per op (Tensor! marks what an op writes)
// and the CPU kernels. CUDA kernels register in ops/csrc/cuda/*.cu with
// TORCH_LIBRARY_IMPL(splitvl, CUDA, m); more ops join via TORCH_LIBRARY_FRAGMENT.
#include <torch/library.h>

#include "cpu/ops_cpu.h"

TORCH_LIBRARY(splitvl, m) {
  m.def("rms_norm(Tensor! out, Tensor input, Tensor weight, float epsilon) -> ()");
  m.def("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()");
  m.def(
      "rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
      "Tensor cos_sin_cache, bool is_neox, int[] mrope_section, bool mrope_interleaved) -> ()");
  m.def("silu_and_mul(Tensor! out, Tensor input) -> ()");
  m.def("gelu_tanh(Tensor! out, Tensor input) -> ()");
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
      "Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention_decode(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale) -> ()");
  m.def(
      "varlen_attention(Tensor! out, Tensor query, Tensor? key, Tensor? value, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float scale, bool causal, Tensor? key_cache, Tensor? value_cache, "
      "Tensor? block_tables) -> ()");
  m.def(
      "topk_softmax(Tensor! topk_weights, Tensor! topk_ids, Tensor gating_output, "
      "bool renormalize) -> ()");
}

TORCH_LIBRARY_IMPL(splitvl, CPU, m) {
  m.impl("rms_norm", &splitvl::cpu::rms_norm);
  m.impl("fused_add_rms_norm", &splitvl::cpu::fused_add_rms_norm);
  m.impl("rotary_embedding", &splitvl::cpu::rotary_embedding);
  m.impl("silu_and_mul", &splitvl::cpu::silu_and_mul);
  m.impl("gelu_tanh", &splitvl::cpu::gelu_tanh);
  m.impl("reshape_and_cache", &splitvl::cpu::reshape_and_cache);
  m.impl("paged_attention_decode", &splitvl::cpu::paged_attention_decode);
  m.impl("varlen_attention", &splitvl::cpu::varlen_attention);
  m.impl("topk_softmax", &splitvl::cpu::topk_softmax);
}
