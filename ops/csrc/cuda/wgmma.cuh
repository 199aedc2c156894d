// Hopper warpgroup MMA (wgmma.mma_async, sm_90a) as inline PTX: shared-memory matrix
// descriptors, the fence / commit / wait protocol, and the m64nNk16 shapes the sm_90 attention
// kernel uses (varlen_attention_sm90.cu). Sections cited are of the PTX ISA 8.x, 9.7.15
// "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions".
//
// Every function here assembles to wgmma only under __CUDA_ARCH_FEAT_SM90_ALL (a compute_90a
// build); callers guard their kernel bodies with the same macro, so other archs compile an
// empty body and the host never launches it (the probe in varlen_attention_sm90.cu).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace splitvl::cuda::wgmma {

// Shared-memory matrix descriptor, 9.7.15.5.1.2.2 "Matrix Descriptor Format":
//   bits 13-0  start address, (addr & 0x3FFFF) >> 4 (shared state space, 16-byte aligned)
//   bits 29-16 leading dimension byte offset (LBO) >> 4
//   bits 45-32 stride dimension byte offset (SBO) >> 4
//   bits 51-49 base offset (swizzled modes only): 0
//   bits 63-62 swizzle mode: 0 = none ("interleave"), the only mode used here.
// With no swizzle, a core matrix is 8 rows of 16 bytes stored contiguously (128 bytes), and
// the canonical layouts of 9.7.15.5.1.2.1.3 (CuTe notation, T = 8 16-bit elements) are
//   K-major : ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO))
//     8 rows (M or N) 16 bytes apart, then groups of 8 rows SBO apart; along K, 8 contiguous
//     elements, then the next 8 of K at LBO.
//   MN-major: ((T, 1, m), (8, k)) : ((1, T, SBO), (1T, LBO))
//     8 contiguous elements of M/N, then the next 8 of M/N at SBO; along K, 8 rows 16 bytes
//     apart, then the next 8 of K at LBO.
__device__ __forceinline__ uint64_t make_desc(const void* smem, uint32_t lbo_bytes,
                                              uint32_t sbo_bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32);
}

// wgmma.fence: orders this thread's register writes (accumulators, A fragments) and shared
// memory accesses before the wgmma ops issued after it (9.7.15.7.1). Needed before the first
// wgmma and whenever other instructions touched its registers in between.
__device__ __forceinline__ void fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Close the wgmma ops issued so far into one group (9.7.15.7.2).
__device__ __forceinline__ void commit_group() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Wait until at most N of this warpgroup's groups are pending; groups complete in order
// (9.7.15.7.3). Their accumulators may be read only after this.
template <int N>
__device__ __forceinline__ void wait_group() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Writes by the generic proxy (cp.async, st.shared) become visible to the async proxy that
// wgmma reads shared memory through: each writer runs this after its writes landed and before
// the barrier that precedes the wgmma (PTX ISA 9.7.13.x "fence.proxy.async").
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Pins accumulator registers at this point of the program for the compiler: after a wait, no
// read of them moves above it; before an issue, every write to them is done (CUTLASS calls this
// warpgroup_fence_operand).
template <int N8>
__device__ __forceinline__ void fence_operands(float (&d)[N8][4]) {
#pragma unroll
  for (int j = 0; j < N8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[j][i])::"memory");
}

// Accumulator fragment of m64nNk16 (9.7.15.5.1.1.1, Figure 149): warp w of the warpgroup holds
// rows 16w..16w+15; lane l = 4g + t holds, for each n8 tile j, d[j][0..1] = row 16w + g,
// columns 8j + 2t + {0, 1}, and d[j][2..3] = row 16w + g + 8, the same columns: per warp the
// layout of mma.sync m16n8's C fragment, repeated over the N/8 tiles.
//
// Register A fragment of m64nNk16, 16-bit types (Figure 148): four 32-bit registers of two
// elements, the layout of mma.sync m16n8k16's A: {row g, k 2t..2t+1}, {row g + 8, k 2t..},
// {row g, k 8 + 2t..}, {row g + 8, k 8 + 2t..}. So accumulator tiles 2kk and 2kk + 1 packed
// pairwise are the A fragment of k-step kk, with no shuffles.

#define SPLITVL_WGMMA_ACC(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define SPLITVL_WGMMA_OUT(j) "=f"(d[j][0]), "=f"(d[j][1]), "=f"(d[j][2]), "=f"(d[j][3])

// D[64 x 128] = A[64 x 16] * B[16 x 128] (+ D when ACCUMULATE), A and B K-major in shared memory
// (imm-trans-a = imm-trans-b = 0), fp32 accumulators. Without ACCUMULATE (scale-d = 0) D is
// write-only for the compiler: its old registers are dead, so the caller may overwrite them
// (the softmax) without ptxas serializing the wgmma pipeline, which it does when non-wgmma
// instructions write a wgmma accumulator while another wgmma group is in flight.
template <typename T, bool ACCUMULATE>
__device__ __forceinline__ void mma_ss_n128(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SPLITVL_WGMMA_SS_N128(PTX_TYPE, D)                                                         \
  asm volatile(                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " "                    \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "    \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, " \
      "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, " \
      "%55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"               \
      : D(0), D(1), D(2), D(3), D(4), D(5), D(6), D(7), D(8), D(9), D(10), D(11), D(12), D(13),    \
        D(14), D(15)                                                                              \
      : "l"(desc_a), "l"(desc_b), "r"(int(ACCUMULATE)))
  if constexpr (std::is_same_v<T, __nv_bfloat16> && ACCUMULATE) {
    SPLITVL_WGMMA_SS_N128("bf16", SPLITVL_WGMMA_ACC);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    SPLITVL_WGMMA_SS_N128("bf16", SPLITVL_WGMMA_OUT);
  } else if constexpr (ACCUMULATE) {
    SPLITVL_WGMMA_SS_N128("f16", SPLITVL_WGMMA_ACC);
  } else {
    SPLITVL_WGMMA_SS_N128("f16", SPLITVL_WGMMA_OUT);
  }
#undef SPLITVL_WGMMA_SS_N128
#endif
}

// D[64 x N] += A[64 x 16] * B[16 x N], A from registers (the fragment above), B MN-major in
// shared memory (imm-trans-b = 1: B[k][n] at n contiguous, valid for 16-bit types only).
template <typename T, int N>
__device__ __forceinline__ void mma_rs_tn(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                          uint64_t desc_b) {
  static_assert(N == 64 || N == 80, "mma_rs_tn: N = 64 or 80");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SPLITVL_WGMMA_RS(SHAPE, PTX_TYPE, REGS, A_REGS, B_DESC, SCALE_D)                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                          \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." PTX_TYPE "." PTX_TYPE " {" REGS \
               "}, {" A_REGS "}, " B_DESC ", p, 1, 1, 1;\n}\n"                              \
               : SPLITVL_WGMMA_OUTS                                                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define SPLITVL_REGS_32                                                                         \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
  if constexpr (N == 64) {
#define SPLITVL_WGMMA_OUTS                                                                     \
  SPLITVL_WGMMA_ACC(0), SPLITVL_WGMMA_ACC(1), SPLITVL_WGMMA_ACC(2), SPLITVL_WGMMA_ACC(3),      \
      SPLITVL_WGMMA_ACC(4), SPLITVL_WGMMA_ACC(5), SPLITVL_WGMMA_ACC(6), SPLITVL_WGMMA_ACC(7)
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      SPLITVL_WGMMA_RS("m64n64k16", "bf16", SPLITVL_REGS_32, "%32, %33, %34, %35", "%36", "%37");
    } else {
      SPLITVL_WGMMA_RS("m64n64k16", "f16", SPLITVL_REGS_32, "%32, %33, %34, %35", "%36", "%37");
    }
#undef SPLITVL_WGMMA_OUTS
  } else {
#define SPLITVL_WGMMA_OUTS                                                                     \
  SPLITVL_WGMMA_ACC(0), SPLITVL_WGMMA_ACC(1), SPLITVL_WGMMA_ACC(2), SPLITVL_WGMMA_ACC(3),      \
      SPLITVL_WGMMA_ACC(4), SPLITVL_WGMMA_ACC(5), SPLITVL_WGMMA_ACC(6), SPLITVL_WGMMA_ACC(7),  \
      SPLITVL_WGMMA_ACC(8), SPLITVL_WGMMA_ACC(9)
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      SPLITVL_WGMMA_RS("m64n80k16", "bf16", SPLITVL_REGS_32 ", %32, %33, %34, %35, %36, %37, %38, %39",
                       "%40, %41, %42, %43", "%44", "%45");
    } else {
      SPLITVL_WGMMA_RS("m64n80k16", "f16", SPLITVL_REGS_32 ", %32, %33, %34, %35, %36, %37, %38, %39",
                       "%40, %41, %42, %43", "%44", "%45");
    }
#undef SPLITVL_WGMMA_OUTS
  }
#undef SPLITVL_REGS_32
#undef SPLITVL_WGMMA_RS
#endif
}

#undef SPLITVL_WGMMA_OUT
#undef SPLITVL_WGMMA_ACC

}  // namespace splitvl::cuda::wgmma
