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

}  // namespace splitvl::cuda
