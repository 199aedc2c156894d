// Shared helpers of the splitvl CPU kernels: argument checks and row addressing
// of strided [..., D] views.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../check.h"

#include <array>
#include <cstdint>

namespace splitvl::cpu {

#define SPLITVL_CHECK_CPU(x) \
  SPLITVL_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define SPLITVL_CHECK_LAST_CONTIG(x) \
  SPLITVL_CHECK((x).dim() >= 1 && ((x).size(-1) <= 1 || (x).stride(-1) == 1), \
              #x " must have unit stride in its last dim, got strides ", (x).strides())
#define SPLITVL_CHECK_CONTIG(x) \
  SPLITVL_CHECK((x).is_contiguous(), #x " must be contiguous, got strides ", (x).strides())
#define SPLITVL_CHECK_DTYPE(x, dt) \
  SPLITVL_CHECK((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())
#define SPLITVL_CHECK_FLOAT_DTYPE(x)                                           \
  SPLITVL_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 || \
                  (x).scalar_type() == at::kHalf,                                 \
              #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())

// Dispatch over the dtypes the kernels support; math runs in at::opmath_type (fp32).
#define SPLITVL_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Element offset of row r of a tensor viewed as [rows, D] (D = last dim, unit
// stride). Outer dims keep their own strides, so slices of a fused projection
// (q/k heads of a qkv tensor) are addressed without a copy.
class RowIndexer {
 public:
  static constexpr int kMaxDims = 8;

  explicit RowIndexer(const at::Tensor& t) {
    SPLITVL_CHECK(t.dim() >= 1 && t.dim() - 1 <= kMaxDims, "tensor of ", t.dim(),
                " dims is not supported (1..", kMaxDims + 1, ")");
    ndim_ = static_cast<int>(t.dim()) - 1;
    rows_ = 1;
    for (int i = 0; i < ndim_; ++i) {
      sizes_[i] = t.size(i);
      strides_[i] = t.stride(i);
      rows_ *= sizes_[i];
    }
    // Uniform row stride when the outer dims collapse into one.
    uniform_ = true;
    for (int i = 0; i + 1 < ndim_; ++i) {
      if (sizes_[i] > 1 && strides_[i] != strides_[i + 1] * sizes_[i + 1]) uniform_ = false;
    }
    row_stride_ = ndim_ == 0 ? 0 : strides_[ndim_ - 1];
  }

  int64_t rows() const { return rows_; }

  int64_t offset(int64_t r) const {
    if (uniform_) return r * row_stride_;
    int64_t off = 0;
    for (int i = ndim_ - 1; i >= 0; --i) {
      off += (r % sizes_[i]) * strides_[i];
      r /= sizes_[i];
    }
    return off;
  }

 private:
  int ndim_ = 0;
  int64_t rows_ = 1;
  bool uniform_ = true;
  int64_t row_stride_ = 0;
  std::array<int64_t, kMaxDims> sizes_{};
  std::array<int64_t, kMaxDims> strides_{};
};

// Rows handled per parallel task so each task does roughly `work` element ops.
inline int64_t grain_for(int64_t row_len, int64_t work = 32768) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, row_len));
}

// Value checks of the linear-attention ops that read cu_seqlens / state_indices
// (on CUDA they would need a device sync): cu_seqlens starts at 0, never
// decreases and ends at `tokens` (undefined: skipped); slots are < num_slots and
// distinct (< 0: none).
void check_seqlens_and_slots(const at::Tensor& cu_seqlens, const at::Tensor& state_indices,
                             int64_t tokens, int64_t num_slots, const char* op);

}  // namespace splitvl::cpu
