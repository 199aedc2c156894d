// Shared by the rotary kernels (rotary.cu, qk_norm_rope.cu): the mRoPE section layout
// and which row of sectioned positions each frequency reads. See ops/reference.py.
#pragma once

#include "common.cuh"

namespace splitvl::cuda {

constexpr int kMaxSections = 8;

struct Sections {
  int count;  // 0: plain positions [T]
  int size[kMaxSections];
  bool interleaved;
};

// Which row of sectioned positions frequency i reads (reference: mrope_rows).
__device__ __forceinline__ int section_row(const Sections& s, int i) {
  if (s.interleaved) {
    if (i % 3 == 1 && i < 3 * s.size[1]) return 1;
    if (i % 3 == 2 && i < 3 * s.size[2]) return 2;
    return 0;
  }
  int end = 0;
  for (int r = 0; r < s.count; ++r) {
    end += s.size[r];
    if (i < end) return r;
  }
  return s.count - 1;
}

// Token t's cos (cs[0, rot_half)) and sin (cs[rot_half, 2 rot_half)) rows into shared memory,
// each frequency at the position its section reads. Every thread of the block takes part;
// the caller syncs before reading.
__device__ __forceinline__ void stage_cos_sin(float* cs, const int64_t* __restrict__ positions,
                                              int64_t pos_row_stride, int64_t pos_col_stride, int64_t t,
                                              const float* __restrict__ cache, int64_t max_pos, int rot_half,
                                              const Sections& sec) {
  for (int i = threadIdx.x; i < rot_half; i += blockDim.x) {
    const int row = sec.count ? section_row(sec, i) : 0;
    const int64_t pos = positions[row * pos_row_stride + t * pos_col_stride];
    CUDA_KERNEL_ASSERT(pos >= 0 && pos < max_pos && "rotary: position out of cache range");
    const float* c = cache + pos * 2 * rot_half;
    cs[i] = c[i];
    cs[rot_half + i] = c[rot_half + i];
  }
}

inline Sections make_sections(at::IntArrayRef mrope_section, bool interleaved, int rot_half, const char* op) {
  Sections s{static_cast<int>(mrope_section.size()), {}, interleaved};
  SPLITVL_CHECK(s.count <= kMaxSections, op, ": at most ", kMaxSections, " mrope sections");
  int64_t total = 0;
  for (int i = 0; i < s.count; ++i) {
    SPLITVL_CHECK(mrope_section[i] >= 0, op, ": negative mrope section");
    s.size[i] = static_cast<int>(mrope_section[i]);
    total += mrope_section[i];
  }
  SPLITVL_CHECK(s.count == 0 || total == rot_half, op, ": sum(mrope_section)=", total,
              " must equal rot_dim/2=", rot_half);
  SPLITVL_CHECK(!interleaved || s.count == 3, op, ": interleaved mrope needs exactly 3 sections");
  return s;
}

// positions: [T] int64 for plain RoPE, [sections, T] for sectioned.
inline void check_positions(const at::Tensor& positions, const Sections& sec, const char* op) {
  SPLITVL_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64");
  if (sec.count == 0) {
    SPLITVL_CHECK(positions.dim() == 1, op, ": plain RoPE needs positions [T], got ", positions.sizes());
  } else {
    SPLITVL_CHECK(positions.dim() == 2 && positions.size(0) == sec.count, op,
                ": sectioned RoPE needs positions [", sec.count, ", T], got ", positions.sizes());
  }
}

}  // namespace splitvl::cuda
