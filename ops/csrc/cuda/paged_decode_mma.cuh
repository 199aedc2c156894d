// paged_attention_decode on tensor cores for GQA groups of 4 or more (bf16/fp16, head
// dim 128 or 256). On CUDA cores every K/V element costs two FMAs per query head, so
// groups of 8 are compute-bound there; with mma.m16n8k16 the kernel stays at memory speed.
//
// A CTA serves the (up to) 8 query heads of one KV head; each warp takes 16-token blocks
// of the partition in turn. Per block: S[16 x 16 tokens] = Q[16 (8 heads, 8 zero rows) x D]
// . K^T, then O^T[D x 8 heads] += V^T[D x 16 tokens] . P^T. Both products read K and V
// straight from global memory into fragments: the dims of S's inner dimension and the
// rows of O^T are permuted so that each lane loads whole 16-byte chunks of a row, and the
// S accumulator of a lane is exactly the P^T fragment it needs (no shared memory trip).
//   S:  lane (g, t) = (lane / 4, lane % 4) loads key tokens g and 8 + g, dims
//       [32kb + 8t, +8) per 32-dim block kb; k-step (kb, hs) uses words 2hs, 2hs + 1 of
//       that chunk for the fragment slots (2t, 2t + 1) and (2t + 8, 2t + 9). q is loaded the
//       same way, so Q's A fragment is the same words of its own chunk.
//   PV: lane (g, t) loads value tokens {2t, 2t + 1, 2t + 8, 2t + 9}, chunks g + 8c; m-tile
//       mt (pair q2 = mt / 8, j = mt % 8) has row g <-> dim 8(g + 16 q2) + j and row
//       g + 8 <-> that + 64. Two tokens' halves are paired with byte permutes.
#pragma once

#include "attention_common.cuh"
#include "paged_decode_common.cuh"
#include "paged_decode_merge.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {

constexpr int kMmaHeads = 8;  // query heads per CTA (the n = 8 of the PV product)

template <typename T>
__device__ __forceinline__ uint4 load16(const T* ptr) {
  return *reinterpret_cast<const uint4*>(ptr);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads, D >= 256 ? 2 : 3)
    paged_decode_mma_kernel(DecodeParams<T> p) {
  constexpr int KB = D / 32;  // 32-dim blocks of a key row
  constexpr int VC = D / 64;  // value chunks per lane and token
  constexpr int MT = D / 16;  // m-tiles of O^T
  constexpr int H = kMmaHeads;
  extern __shared__ float smem[];
  int* rows = reinterpret_cast<int*>(smem);  // [kMaxPartition]
  float* red_acc = smem + kMaxPartition;     // [warps, H, D]
  pdl_wait();  // q, the cache, block tables and lengths come from earlier kernels (pdl.cuh)
  pdl_launch_dependents();
  float* red_m = red_acc + kDecodeWarps * H * D;
  float* red_w = red_m + kDecodeWarps * H;

  const DecodeCta cta = decode_cta(p, H);
  const int kv_head = cta.kv_head, b = cta.b, split = cta.split, h0 = cta.h0, heads = cta.heads;
  const int start = cta.start;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  uint4 qa[KB];  // head h0 + g (rows past the group repeat the last head; not written)
  const T* qrow = p.q + b * p.q_s0 + (h0 + min(g, heads - 1)) * p.q_s1;
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) qa[kb] = load16(qrow + 32 * kb + 8 * t);
  int phys[kRowsPerThread];
  load_phys(p, b, start, phys);
  const int seq_len = max(p.seq_lens[b], 0);
  store_rows(p, start, phys, rows);
  __syncthreads();
  if (start >= seq_len && split > 0) return;  // unused partition: the merges skip it
  const int n = min(seq_len - start, p.part);
  const int used = used_partitions(p, seq_len);
  const bool direct = p.splits == 1 || (p.merge_tickets != nullptr && used <= 1);

  const float qscale = p.scale * kLog2e;
  const T* kbase = p.key_cache + int64_t(kv_head) * D;
  const T* vbase = p.value_cache + int64_t(kv_head) * D;
  float m = -INFINITY, l = 0.f;  // head g: running max (base 2) and this lane's share of the sum
  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  // Warp-uniform bound: mma.sync needs every lane.
  for (int blk = warp * 16; blk < n; blk += kDecodeWarps * 16) {
    uint4 kr[2][KB], vr[4][VC];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t off = int64_t(rows[min(blk + 8 * nt + g, n - 1)]) * D;
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) kr[nt][kb] = load16(kbase + off + 32 * kb + 8 * t);
    }
    bool valid[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = blk + 2 * t + (r & 1) + 8 * (r >> 1);
      valid[r] = i < n;
      const int64_t off = int64_t(rows[min(i, n - 1)]) * D;
#pragma unroll
      for (int c = 0; c < VC; ++c) vr[r][c] = load16(vbase + off + 8 * (g + 8 * c));
    }
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kb = 0; kb < KB; ++kb)
#pragma unroll
        for (int hs = 0; hs < 2; ++hs) {
          const uint32_t a[4] = {word(qa[kb], 2 * hs), 0u, word(qa[kb], 2 * hs + 1), 0u};
          mma_16816<T>(s[nt], a, word(kr[nt][kb], 2 * hs), word(kr[nt][kb], 2 * hs + 1));
        }
    }
    // Lane (g, t) holds head g's scores of tokens 2t, 2t + 1, 8 + 2t, 9 + 2t (r = 0..3).
    float pr[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) pr[r] = valid[r] ? s[r >> 1][r & 1] * qscale : -INFINITY;
    float mx = fmaxf(fmaxf(pr[0], pr[1]), fmaxf(pr[2], pr[3]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2)), m);
    const float ms = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(m - ms);
    m = mx;
    l *= alpha;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      pr[r] = exp2f(pr[r] - ms);  // 0 when masked
      l += pr[r];
    }
    // O^T columns of this lane are heads 2t and 2t + 1, whose alphas live in quads 2t, 2t + 1.
    const float a0 = __shfl_sync(0xffffffffu, alpha, 8 * t);
    const float a1 = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
    const uint32_t pb0 = pack2<T>(pr[0], pr[1]), pb1 = pack2<T>(pr[2], pr[3]);
    // Masked tokens' values are zeroed: 0 * garbage must not become NaN.
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < VC; ++c)
        if (!valid[r]) vr[r][c] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int j = mt % 8, c0 = 2 * (mt / 8), c1 = c0 + 1;
      const uint32_t sel = (j & 1) ? 0x7632u : 0x5410u;  // high or low halves of two words
      const uint32_t a[4] = {__byte_perm(word(vr[0][c0], j >> 1), word(vr[1][c0], j >> 1), sel),
                             __byte_perm(word(vr[0][c1], j >> 1), word(vr[1][c1], j >> 1), sel),
                             __byte_perm(word(vr[2][c0], j >> 1), word(vr[3][c0], j >> 1), sel),
                             __byte_perm(word(vr[2][c1], j >> 1), word(vr[3][c1], j >> 1), sel)};
      acc[mt][0] *= a0;
      acc[mt][1] *= a1;
      acc[mt][2] *= a0;
      acc[mt][3] *= a1;
      mma_16816<T>(acc[mt], a, pb0, pb1);
    }
  }
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int d0 = 8 * (g + 16 * (mt / 8)) + mt % 8;
    float* o0 = red_acc + (warp * H + 2 * t) * D;  // head 2t; head 2t + 1 is D further
    o0[d0] = acc[mt][0];
    o0[D + d0] = acc[mt][1];
    o0[d0 + 64] = acc[mt][2];
    o0[D + d0 + 64] = acc[mt][3];
  }
  if (t == 0) {
    red_m[warp * H + g] = m;
    red_w[warp * H + g] = l;
  }
  __syncthreads();
  finish_partition<T, H>(p, red_acc, red_m, red_w, b, h0, heads, split, direct);
  if (!direct && p.merge_tickets != nullptr) merge_if_last<H>(p, b, h0, heads, split, used);
}

// Launches the kernel for head dim 128 or 256; 16-bit types only (no fp32 mma here).
template <typename T>
void launch_paged_decode_mma(const DecodeParams<T>& p, dim3 grid, cudaStream_t stream) {
  if constexpr (kPack16<T> == 8) {
    const size_t smem = kMaxPartition * sizeof(int) +
                        (kDecodeWarps * kMmaHeads * p.head_dim + 2 * kDecodeWarps * kMmaHeads) * sizeof(float);
    if (p.head_dim == 128) {
      launch_pdl(paged_decode_mma_kernel<T, 128>, grid, kDecodeThreads, smem, stream, p);
    } else {
      launch_pdl(paged_decode_mma_kernel<T, 256>, grid, kDecodeThreads, smem, stream, p);
    }
  }
}

}  // namespace splitvl::cuda
