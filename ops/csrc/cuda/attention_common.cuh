// Shared pieces of the varlen attention kernels: parameters, K/V row addressing
// (packed or paged) and the sm80+ tensor-core primitives (cp.async, ldmatrix, mma).
#pragma once

#include "common.cuh"

namespace splitvl::cuda {

template <typename T>
struct VarlenParams {
  const T* q;  // [Tq, Hq, D]
  int64_t q_s0, q_s1;
  const T* k;  // packed [Tk, Hkv, D], or null when paged
  const T* v;
  int64_t k_s0, k_s1, v_s0, v_s1;
  const T* key_cache;  // paged [num_blocks, block_size, Hkv, D], or null
  const T* value_cache;
  const int* block_tables;  // [B, max_blocks]
  int64_t bt_s0, bt_s1;
  int block_size;
  const int* cu_q;  // [B + 1]
  const int* cu_k;
  T* out;  // [Tq, Hq, D] contiguous
  int num_q_heads, num_kv_heads, group, head_dim;
  float scale;
  bool causal, paged;
};

// Key (or value) row j of sequence b for kv head kvh.
template <typename T>
__device__ __forceinline__ const T* kv_row(const VarlenParams<T>& p, bool value, int b, int kvh,
                                           int k_start, int j) {
  if (p.paged) {
    const int64_t phys = p.block_tables[b * p.bt_s0 + (j / p.block_size) * p.bt_s1];
    const int64_t slot = phys * p.block_size + j % p.block_size;
    return (value ? p.value_cache : p.key_cache) +
           (slot * p.num_kv_heads + kvh) * p.head_dim;
  }
  return value ? p.v + int64_t(k_start + j) * p.v_s0 + int64_t(kvh) * p.v_s1
               : p.k + int64_t(k_start + j) * p.k_s0 + int64_t(kvh) * p.k_s1;
}

// 16-byte async copy global -> shared; `valid == false` writes zeros instead.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

// The instruction differs only in the PTX name of the input type; asm needs it as a literal.
#define SPLITVL_MMA_16816(PTX_TYPE)                                                       \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE            \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n" \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  SPLITVL_MMA_16816("bf16");
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  SPLITVL_MMA_16816("f16");
}

#undef SPLITVL_MMA_16816

// Two floats -> one register of two 16-bit values (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

constexpr float kLog2e = 1.4426950408889634f;

// The online-softmax step of row g + 8 hr (hr = 0, 1) of a warp over one 16 x (8 * NT) score
// tile s in the mma.sync C layout (also that of a wgmma accumulator, per warp). MASKED: score
// column nt * 8 + e of this thread is hidden unless nt * 8 + e < lim[hr]. Updates the running
// row maximum m_i[hr] (over unscaled scores, hence scale > 0), sets alpha[hr], the factor that
// rescales the earlier sum and output, and returns the scaled maximum to subtract before exp2.
template <bool MASKED, int NT>
__device__ __forceinline__ float softmax_row_max(const float (&s)[NT][4], int hr, float (&m_i)[2],
                                                 const int (&lim)[2], float scale_log2,
                                                 float (&alpha)[2]) {
  float mx = m_i[hr];  // the same in the 4 threads of a row
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      mx = fmaxf(mx, MASKED && nt * 8 + e >= lim[hr] ? -INFINITY : s[nt][2 * hr + e]);
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float mb = mx == -INFINITY ? 0.f : mx * scale_log2;  // scaled max, finite
  alpha[hr] = mx == m_i[hr] ? 1.f : exp2f(m_i[hr] * scale_log2 - mb);
  m_i[hr] = mx;
  return mb;
}

// o *= alpha per row, skipped when no row max of the warp grew.
template <int ND>
__device__ __forceinline__ void rescale_rows(float (&o)[ND][4], const float (&alpha)[2]) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      o[nd][0] *= alpha[0];
      o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1];
      o[nd][3] *= alpha[1];
    }
  }
}

// Fold score tile s into the running softmax (softmax_row_max's terms) and the output o; on
// return s holds the unnormalised probabilities (hidden ones 0).
template <bool MASKED, int NT, int ND>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&o)[ND][4],
                                               float (&m_i)[2], float (&l_i)[2],
                                               const int (&lim)[2], float scale_log2) {
  float alpha[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float mb = softmax_row_max<MASKED>(s, hr, m_i, lim, scale_log2, alpha);
    float rs = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& v = s[nt][2 * hr + e];
        v = exp2f(fmaf(MASKED && nt * 8 + e >= lim[hr] ? -INFINITY : v, scale_log2, -mb));
        rs += v;
      }
    l_i[hr] = l_i[hr] * alpha[hr] + rs;
  }
  rescale_rows(o, alpha);
}

// The A fragment (m16n8k16 / wgmma m64nNk16 layout) of probabilities for keys [16 kk, 16 kk + 16)
// from score tiles 2 kk and 2 kk + 1 (C / accumulator layout), rounded to T.
template <typename T, int NT>
__device__ __forceinline__ void p_fragment(uint32_t (&a)[4], const float (&s)[NT][4], int kk) {
  a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Normalise and store the output rows r0 + g and r0 + g + 8 (< Lq) of a warp's 16 rows of head
// h from its C / accumulator layout fragment; l_i holds this thread's partial row sums (the 4
// threads of a row add them here). A row that saw no key writes zeros.
template <typename T, int ND>
__device__ __forceinline__ void store_rows(const VarlenParams<T>& p, const float (&o)[ND][4],
                                           const float (&l_i)[2], int h, int q_start, int r0, int Lq) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = l_i[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = r0 + g + hr * 8;
    if (row >= Lq) continue;
    T* dst = p.out + (int64_t(q_start + row) * p.num_q_heads + h) * p.head_dim;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      const int d = nd * 8 + 2 * t4;
      if (d < p.head_dim)
        *reinterpret_cast<uint32_t*>(dst + d) = pack2<T>(o[nd][2 * hr] * inv, o[nd][2 * hr + 1] * inv);
    }
  }
}

}  // namespace splitvl::cuda
