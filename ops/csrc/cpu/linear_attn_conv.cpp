// CPU kernels: depthwise causal conv1d over packed sequences (prefill) and its
// one-token update (decode), with conv states in a slot pool.
// Semantics: ops/reference_linear_attn.py (causal_conv1d_fwd / _update).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../linear_attn_checks.h"
#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {

void check_seqlens_and_slots(const at::Tensor& cu_seqlens, const at::Tensor& state_indices,
                             int64_t tokens, int64_t num_slots, const char* op) {
  const int64_t batch = state_indices.numel();
  if (cu_seqlens.defined()) {
    const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
    SPLITVL_CHECK(cu[0] == 0, op, ": cu_seqlens[0] must be 0, got ", cu[0]);
    for (int64_t b = 0; b < batch; ++b) {
      SPLITVL_CHECK(cu[b + 1] >= cu[b], op, ": cu_seqlens must be non-decreasing (entry ", b + 1,
                  ")");
    }
    SPLITVL_CHECK(cu[batch] == tokens, op, ": cu_seqlens[-1] = ", cu[batch], " but there are ",
                tokens, " tokens");
  }
  const int32_t* slots = state_indices.data_ptr<int32_t>();
  std::vector<int32_t> used;
  used.reserve(batch);
  for (int64_t b = 0; b < batch; ++b) {
    SPLITVL_CHECK(slots[b] < num_slots, op, ": state_indices[", b, "] = ", slots[b],
                " is out of range for ", num_slots, " slots");
    if (slots[b] >= 0) used.push_back(slots[b]);
  }
  std::sort(used.begin(), used.end());
  SPLITVL_CHECK(std::adjacent_find(used.begin(), used.end()) == used.end(), op,
              ": two sequences share a state slot");
}

namespace {

constexpr int64_t kChannelBlock = 64;

inline float silu_f(float v) { return v / (1.f + std::exp(-v)); }

// One sequence, channels [c0, c1): outputs, then the new conv state.
template <typename scalar_t>
void conv_sequence(scalar_t* out, const scalar_t* x, int64_t x_stride, const scalar_t* weight,
                   const scalar_t* bias, scalar_t* state, bool use_state, int64_t begin,
                   int64_t len, int64_t dim, int64_t width, int64_t c0, int64_t c1, bool silu) {
  const int64_t hist = width - 1;
  std::vector<float> window(width);
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* w = weight + c * width;
    const scalar_t* init = state != nullptr ? state + c * hist : nullptr;
    // Input at sequence position p (negative: from the initial state).
    auto input = [&](int64_t p) -> float {
      if (p >= 0) return static_cast<float>(x[(begin + p) * x_stride + c]);
      return use_state ? static_cast<float>(init[hist + p]) : 0.f;
    };
    for (int64_t t = 0; t < len; ++t) {
      float acc = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
      for (int64_t j = 0; j < width; ++j) acc += static_cast<float>(w[j]) * input(t - hist + j);
      // As the reference: the conv result is rounded to the dtype before SiLU.
      float y = static_cast<float>(static_cast<scalar_t>(acc));
      if (silu) y = silu_f(y);
      out[(begin + t) * dim + c] = static_cast<scalar_t>(y);
    }
    if (state == nullptr) continue;
    // New state = last `hist` inputs; reads at positions > j happen before their writes.
    for (int64_t j = 0; j < hist; ++j) {
      state[c * hist + j] = static_cast<scalar_t>(input(len - hist + j));
    }
  }
}

template <typename scalar_t>
void conv_fwd_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                   const int32_t* cu, const int32_t* slots, const bool* has_init, int64_t batch,
                   bool silu) {
  const int64_t dim = x.size(1), width = weight.size(1), hist = width - 1;
  const int64_t blocks = (dim + kChannelBlock - 1) / kChannelBlock;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const scalar_t* w_p = weight.data_ptr<scalar_t>();
  const scalar_t* b_p = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  scalar_t* s_p = conv_states.data_ptr<scalar_t>();
  const int64_t x_stride = x.stride(0);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / blocks, blk = task % blocks;
      const int64_t c0 = blk * kChannelBlock, c1 = std::min(dim, c0 + kChannelBlock);
      const int64_t begin = cu != nullptr ? cu[b] : b;
      const int64_t len = cu != nullptr ? cu[b + 1] - cu[b] : 1;
      scalar_t* state = slots[b] >= 0 ? s_p + slots[b] * dim * hist : nullptr;
      const bool use_state = state != nullptr && (has_init == nullptr || has_init[b]);
      conv_sequence<scalar_t>(out_p, x_p, x_stride, w_p, b_p, state, use_state, begin, len, dim,
                              width, c0, c1, silu);
    }
  });
}

void conv_dispatch(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                   const int32_t* cu, const at::Tensor& state_indices, const bool* has_init,
                   bool silu) {
  const int64_t batch = state_indices.numel();
  const int32_t* slots = state_indices.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d", [&] {
    conv_fwd_impl<scalar_t>(out, x, weight, bias, conv_states, cu, slots, has_init, batch, silu);
  });
}

}  // namespace

void causal_conv1d_fwd(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                       const at::Tensor& cu_seqlens, const at::Tensor& state_indices,
                       const std::optional<at::Tensor>& has_initial_state, bool silu) {
  const LinearAttnCall call = check_causal_conv1d_fwd(out, x, weight, bias, conv_states, cu_seqlens,
                                                      state_indices, has_initial_state);
  check_seqlens_and_slots(cu_seqlens, state_indices, x.size(0), conv_states.size(0), call.op);
  const bool* has_init = has_initial_state.has_value() ? has_initial_state->data_ptr<bool>() : nullptr;
  conv_dispatch(out, x, weight, bias, conv_states, cu_seqlens.data_ptr<int32_t>(), state_indices,
                has_init, silu);
}

void causal_conv1d_update(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::Tensor& conv_states,
                          const at::Tensor& state_indices, bool silu) {
  const LinearAttnCall call =
      check_causal_conv1d_update(out, x, weight, bias, conv_states, state_indices);
  check_seqlens_and_slots(at::Tensor(), state_indices, x.size(0), conv_states.size(0), call.op);
  conv_dispatch(out, x, weight, bias, conv_states, nullptr, state_indices, nullptr, silu);
}

}  // namespace splitvl::cpu
