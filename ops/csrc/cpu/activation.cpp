// Activations: silu_and_mul (gated MLP), gelu with the tanh approximation (ViT MLP) and
// sigmoid_gate_mul (Qwen3.5 attention output gate).
#include <cmath>

#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

void check_activation_args(const at::Tensor& out, const at::Tensor& input, const char* op) {
  SPLITVL_CHECK_CPU(out);
  SPLITVL_CHECK_CPU(input);
  SPLITVL_CHECK_FLOAT_DTYPE(input);
  SPLITVL_CHECK_LAST_CONTIG(input);
  SPLITVL_CHECK_CONTIG(out);
  SPLITVL_CHECK(out.scalar_type() == input.scalar_type(), op, ": out dtype ", out.scalar_type(),
              " != input dtype ", input.scalar_type());
}

inline float silu(float x) { return x / (1.f + std::exp(-x)); }

inline float gelu_tanh_scalar(float x) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  return 0.5f * x * (1.f + std::tanh(kBeta * (x + kKappa * x * x * x)));
}

// Every row of `input` (viewed as rows of its last dim; outer strides kept) through
// `row(x, i)`, which gives element i of the contiguous output row (d elements).
template <typename RowFn>
void map_rows(at::Tensor& out, const at::Tensor& input, int64_t d, RowFn row) {
  const RowIndexer rows(input);
  // check_activation_args has checked the dtype.
  SPLITVL_DISPATCH_FLOATING(input.scalar_type(), "splitvl_activation", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows.rows(), grain_for(d), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* x = in + rows.offset(r);
        scalar_t* y = o + r * d;
        for (int64_t i = 0; i < d; ++i) y[i] = static_cast<scalar_t>(row(x, i));
      }
    });
  });
}

}  // namespace

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  check_activation_args(out, input, "silu_and_mul");
  const int64_t d = input.size(-1) / 2;
  SPLITVL_CHECK(input.size(-1) % 2 == 0, "silu_and_mul: last dim ", input.size(-1), " must be even");
  auto expected = input.sizes().vec();
  expected.back() = d;
  SPLITVL_CHECK(out.sizes() == at::IntArrayRef(expected), "silu_and_mul: out ", out.sizes(),
              " must be ", at::IntArrayRef(expected));
  if (out.numel() == 0) return;
  map_rows(out, input, d, [d](const auto* x, int64_t i) {
    return silu(static_cast<float>(x[i])) * static_cast<float>(x[d + i]);
  });
}

void gelu_tanh(at::Tensor& out, const at::Tensor& input) {
  check_activation_args(out, input, "gelu_tanh");
  SPLITVL_CHECK(out.sizes() == input.sizes(), "gelu_tanh: out ", out.sizes(), " must match input ",
              input.sizes());
  if (out.numel() == 0) return;
  map_rows(out, input, input.size(-1), [](const auto* x, int64_t i) {
    return gelu_tanh_scalar(static_cast<float>(x[i]));
  });
}

void sigmoid_gate_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& gate) {
  check_activation_args(out, input, "sigmoid_gate_mul");
  SPLITVL_CHECK_CPU(gate);
  SPLITVL_CHECK_LAST_CONTIG(gate);
  SPLITVL_CHECK(gate.sizes() == input.sizes() && gate.scalar_type() == input.scalar_type(),
                "sigmoid_gate_mul: gate ", gate.sizes(), " ", gate.scalar_type(), " must match input ",
                input.sizes(), " ", input.scalar_type());
  SPLITVL_CHECK(out.sizes() == input.sizes(), "sigmoid_gate_mul: out ", out.sizes(), " must match input ",
                input.sizes());
  if (out.numel() == 0) return;
  const RowIndexer rows(input), gate_rows(gate);
  const int64_t d = input.size(-1);
  SPLITVL_DISPATCH_FLOATING(input.scalar_type(), "sigmoid_gate_mul", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows.rows(), grain_for(d), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* x = in + rows.offset(r);
        const scalar_t* gr = g + gate_rows.offset(r);
        scalar_t* y = o + r * d;
        for (int64_t i = 0; i < d; ++i) {
          const auto s = static_cast<scalar_t>(1.f / (1.f + std::exp(-static_cast<float>(gr[i]))));
          y[i] = static_cast<scalar_t>(static_cast<float>(x[i]) * static_cast<float>(s));
        }
      }
    });
  });
}

}  // namespace splitvl::cpu
