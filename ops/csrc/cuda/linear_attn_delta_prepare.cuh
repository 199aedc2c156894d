// The prepare step of the chunk-parallel gated delta rule: one CTA of kPrepThreads per (chunk, value head), all
// chunks in parallel. Sized so that kPrepCtasPerSm CTAs share an SM at Dk = Dv = 128 in 16 bits (70 KB of shared
// memory, <= 168 registers a thread): the phases below are short and latency-bound, and only other CTAs on the
// same SM hide their loads.
//  - gates: the cumulative log decay and beta of the chunk's rows;
//  - rows: l2-normalized q, k (a 16-lane group per row, 16-byte loads where strides and pointers allow) into shared
//    memory, qg = q exp(cum) and kd = k exp(cum_last - cum) into the workspace;
//  - K K^T and Q K^T on tensor cores; p = q k^T exp(cum_i - cum_j) masked to j <= i into the workspace;
//  - A = (I + L)^-1 for the strictly lower L[i][j] = beta_i k_i k_j exp(cum_i - cum_j), in fp32: a thread per
//    column, the column in registers;
//  - w = A diag(beta exp(cum)) K and u = A diag(beta) V on tensor cores. The row scalings are folded into A's
//    columns, so K (already rounded for K K^T) and V (the input) are the exact operands, and A's scaled columns are
//    split in a 16-bit high and low part whose two products keep A's fp32 accuracy.
#pragma once

#include <mma.h>

#include <type_traits>

#include "block_mm.cuh"
#include "common.cuh"
#include "linear_attn_common.cuh"
#include "linear_attn_delta_chunked_layout.cuh"
#include "linear_attn_delta_state_pass.cuh"

namespace splitvl {
namespace {

constexpr int kRowLanes = 16;                          // lanes per q/k row, 8 columns each
constexpr int kRowsPerPass = kPrepThreads / kRowLanes;  // rows in flight per pass over the block
constexpr int kRowBatch = 4;                           // rows per thread whose loads are issued together
constexpr int kStageLd = 20;                           // fp32 staging tile of 16 x 16 per warp
static_assert(kRowLanes * 8 == kMaxDk, "a row group covers Dk");
static_assert(kChunk % (kRowsPerPass * kRowBatch) == 0, "row passes cover the chunk");
static_assert(kPrepThreads >= kChunk, "a thread per column of A");
static_assert(kPrepThreads / 32 == kChunk / 16, "a warp per 16 rows of the w and u products");
static_assert(kPrepThreads / 32 * 16 * kStageLd <= kChunk * (kChunk + 4), "staging tiles fit in f");

// Cumulative gate (warp 0, two rows per lane) and beta of the chunk's rows; zero past n.
__device__ __forceinline__ void load_gates(const float* g, const float* beta, int64_t t0, int n, int h,
                                           int hv, float* cum, float* bet) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x, r0 = 2 * lane, r1 = r0 + 1;
  const float g0 = r0 < n ? g[(t0 + r0) * hv + h] : 0.f;
  const float g1 = r1 < n ? g[(t0 + r1) * hv + h] : 0.f;
  float incl = g0 + g1;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  float excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.f;
  cum[r0] = excl + g0;
  cum[r1] = excl + g0 + g1;
  bet[r0] = r0 < n ? beta[(t0 + r0) * hv + h] : 0.f;
  bet[r1] = r1 < n ? beta[(t0 + r1) * hv + h] : 0.f;
}

// Elements col .. col + 7 of a row (nullptr: a row past the chunk) as floats, zero from `valid` on. vec: 16-byte
// loads (then valid is a multiple of 8 and the row 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load8(float (&out)[8], const T* row, int col, int valid, bool vec) {
  constexpr int kP = kPack16<T>;
  if (row != nullptr && vec && col < valid) {
#pragma unroll
    for (int u = 0; u < 8 / kP; ++u) {
      const Pack<T, kP> pk = *reinterpret_cast<const Pack<T, kP>*>(row + col + u * kP);
#pragma unroll
      for (int e = 0; e < kP; ++e) out[u * kP + e] = to_float(pk.v[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = row != nullptr && col + e < valid ? to_float(row[col + e]) : 0.f;
  }
}

// x rounded to T into dst .. dst + 7 (16-byte aligned), 16 bytes a store.
template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&x)[8]) {
  constexpr int kP = kPack16<T>;
#pragma unroll
  for (int u = 0; u < 8 / kP; ++u) {
    Pack<T, kP> pk;
#pragma unroll
    for (int e = 0; e < kP; ++e) pk.v[e] = from_float<T>(x[u * kP + e]);
    *reinterpret_cast<Pack<T, kP>*>(dst + u * kP) = pk;
  }
}

// Normalized q, k of the chunk's rows into qs, ks (zero past n and past dk); qg, kd into the workspace. A group of
// kRowLanes lanes per row (its sums of squares reduced within the group), kRowBatch rows' loads in flight.
template <typename T>
__device__ __forceinline__ void prepare_rows(const T* q, const T* k, const ChunkArgs& a, int64_t t0, int n, int h,
                                             bool vec, const float* cum, T* qs, int ldq, T* ks, int ldk,
                                             int64_t row0, const ChunkWork<T>& ws) {
  const int group = threadIdx.x / kRowLanes, col = threadIdx.x % kRowLanes * 8;
  const int hq = h / (a.hv / a.hk);
  const float last = cum[n - 1];
#pragma unroll 1
  for (int base = 0; base < kChunk; base += kRowsPerPass * kRowBatch) {
    float qv[kRowBatch][8], kv[kRowBatch][8];
#pragma unroll
    for (int rb = 0; rb < kRowBatch; ++rb) {
      const int r = base + group + rb * kRowsPerPass;
      const int64_t t = t0 + r;
      load8(qv[rb], r < n ? q + t * a.q_tok + hq * a.q_head : nullptr, col, a.dk, vec);
      load8(kv[rb], r < n ? k + t * a.k_tok + hq * a.k_head : nullptr, col, a.dk, vec);
    }
#pragma unroll
    for (int rb = 0; rb < kRowBatch; ++rb) {
      const int r = base + group + rb * kRowsPerPass;
      float sq = 0.f, sk = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        sq += qv[rb][e] * qv[rb][e];
        sk += kv[rb][e] * kv[rb][e];
      }
#pragma unroll
      for (int o = kRowLanes / 2; o > 0; o >>= 1) {  // within the aligned 16-lane group
        sq += __shfl_xor_sync(0xffffffffu, sq, o);
        sk += __shfl_xor_sync(0xffffffffu, sk, o);
      }
      float q_scale = a.scale, k_scale = 1.f;
      if (a.l2norm) {
        q_scale *= rsqrtf(sq + kL2Eps);
        k_scale = rsqrtf(sk + kL2Eps);
      }
      if (col >= a.dkp) continue;
      const float up = expf(cum[r]), down = expf(last - cum[r]);
      float qn[8], kn[8], qg[8], kd[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        qn[e] = qv[rb][e] * q_scale;
        kn[e] = kv[rb][e] * k_scale;
        qg[e] = qn[e] * up;
        kd[e] = kn[e] * down;
      }
      store8(qs + r * ldq + col, qn);
      store8(ks + r * ldk + col, kn);
      store8(ws.qg + (row0 + r) * a.dkp + col, qg);
      store8(ws.kd + (row0 + r) * a.dkp + col, kd);
    }
  }
}

// The chunk's v rows (zero past n and past dv, dvp wide) into vs: cp.async 16 bytes at a time when vec, else
// element loads. One commit group (empty without vec): the caller waits for it.
template <typename T>
__device__ __forceinline__ void load_v(const T* v, const ChunkArgs& a, int64_t t0, int n, int h, bool vec, T* vs,
                                       int ldv) {
  constexpr int kP = kPack16<T>;
  const int units = a.dvp / kP, lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < kChunk; r += blockDim.x / 32) {  // a warp per row: no index division
    for (int u = lane; u < units; u += 32) {
      const int c = u * kP;
      T* dst = vs + r * ldv + c;
      const T* src = v + (t0 + r) * a.v_tok + h * a.v_head + c;  // read only for r < n
      if (vec && r < n && c < a.dv) {
        cp_async16(dst, src);
      } else {
        Pack<T, kP> pk;
#pragma unroll
        for (int e = 0; e < kP; ++e) pk.v[e] = r < n && c + e < a.dv ? src[e] : from_float<T>(0.f);
        *reinterpret_cast<Pack<T, kP>*>(dst) = pk;
      }
    }
  }
  cp_async_commit();
}

// f holds K K^T and becomes L^T in place (f[j][i] = L[i][j] = beta_i k_i k_j exp(cum_i - cum_j) for j < i, zero
// else: K K^T is symmetric); qk holds Q K^T, stored decayed and masked to j <= i as p.
template <typename T>
__device__ __forceinline__ void decay_and_store_p(float* f, const float* qk, int ldf, const float* cum,
                                                  const float* bet, T* p) {
  for (int idx = threadIdx.x; idx < kChunk * kChunk; idx += blockDim.x) {
    const int j = idx / kChunk, i = idx % kChunk;
    const float kk = f[j * ldf + i];
    f[j * ldf + i] = j < i ? bet[i] * kk * expf(cum[i] - cum[j]) : 0.f;
  }
  constexpr int kUnits = kChunk / 8;
  for (int idx = threadIdx.x; idx < kChunk * kUnits; idx += blockDim.x) {
    const int i = idx / kUnits, j0 = idx % kUnits * 8;
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int j = j0 + e;
      x[e] = j <= i ? qk[i * ldf + j] * expf(cum[i] - cum[j]) : 0.f;
    }
    store8(p + i * kChunk + j0, x);
  }
}

// Column `col` of A = (I + L)^-1 into r, given lt[j * ldl + i] = L[i][j] (zero for i <= j): forward substitution
// on the identity's column, eliminated column by column (r[i] -= L[i][j] r[j] for all i > j: independent FMAs, L
// read as broadcast float4). Rows past the chunk's length have zero L rows, so A is the identity there.
__device__ __forceinline__ void invert_column(float (&r)[kChunk], int col, const float* lt, int ldl) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) r[i] = i == col ? 1.f : 0.f;
#pragma unroll
  for (int j = 0; j < kChunk - 1; ++j) {
    const float xj = r[j];
    const float* lj = lt + j * ldl;
#pragma unroll
    for (int i = (j + 1) / 4 * 4; i < kChunk; i += 4) {  // lt[j][i <= j] = 0: aligned groups stay exact
      const float4 l4 = *reinterpret_cast<const float4*>(lj + i);
      r[i] = fmaf(-l4.x, xj, r[i]);
      r[i + 1] = fmaf(-l4.y, xj, r[i + 1]);
      r[i + 2] = fmaf(-l4.z, xj, r[i + 2]);
      r[i + 3] = fmaf(-l4.w, xj, r[i + 3]);
    }
  }
}

// Column col of a_hi + a_lo = A diag(s) in T, from A's column r and s = s_col (a_lo unused for fp32).
template <typename T>
__device__ __forceinline__ void store_scaled_column(const float (&r)[kChunk], int col, float s, T* a_hi, T* a_lo,
                                                    int lda) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const float x = r[i] * s;
    const T hi = from_float<T>(x);
    a_hi[i * lda + col] = hi;
    if constexpr (!std::is_same_v<T, float>) a_lo[i * lda + col] = from_float<T>(x - to_float(hi));
  }
}

// out[kChunk, N] (global, leading dim ldo) = (a_hi + a_lo)[kChunk, kChunk] b[kChunk, N], N a multiple of 16.
// 16-bit: a warp per 16 rows, 16x16 tiles on tensor cores staged in fp32 (`stage`: 16 x kStageLd floats per
// warp) and written 16 bytes a lane; fp32: FMA, a thread per element.
template <typename T>
__device__ __forceinline__ void chunk_product(T* out, int64_t ldo, const T* a_hi, const T* a_lo, int lda,
                                              const T* b, int ldb, int N, float* stage) {
  if constexpr (std::is_same_v<T, float>) {
    for (int idx = threadIdx.x; idx < kChunk * N; idx += blockDim.x) {
      const int m = idx / N, col = idx % N;
      float acc = 0.f;
      for (int kk = 0; kk < kChunk; ++kk) acc = fmaf(a_hi[m * lda + kk], b[kk * ldb + col], acc);
      out[m * ldo + col] = acc;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using AFrag = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, m0 = warp * 16;
    float* st = stage + warp * 16 * kStageLd;
    AFrag ah[kChunk / 16], al[kChunk / 16];  // the warp's 16 rows of A, loaded once for all column tiles
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      wmma::load_matrix_sync(ah[kk], a_hi + m0 * lda + kk * 16, lda);
      wmma::load_matrix_sync(al[kk], a_lo + m0 * lda + kk * 16, lda);
    }
    for (int n0 = 0; n0 < N; n0 += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, b + kk * 16 * ldb + n0, ldb);
        wmma::mma_sync(acc, al[kk], bf, acc);  // the small part first
        wmma::mma_sync(acc, ah[kk], bf, acc);
      }
      wmma::store_matrix_sync(st, acc, kStageLd, wmma::mem_row_major);
      __syncwarp();
      const int r = lane / 2, c = lane % 2 * 8;
      float x[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = st[r * kStageLd + c + e];
      store8(out + (m0 + r) * ldo + n0 + c, x);
      __syncwarp();  // the next tile overwrites st
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads, kPrepCtasPerSm)
    gdn_prepare_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const float* __restrict__ g, const float* __restrict__ beta,
                       const int32_t* __restrict__ cu, const int32_t* __restrict__ offsets, int batch,
                       ChunkArgs a, ChunkWork<T> ws, bool vec) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int c = blockIdx.x, h = blockIdx.y;
  if (c >= offsets[batch]) return;  // the grid is an upper bound on the chunk count
  const int b = find_sequence(offsets, batch, c);
  const int64_t t0 = cu[b] + static_cast<int64_t>(c - offsets[b]) * kChunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), cu[b + 1] - t0));
  const int64_t row0 = (static_cast<int64_t>(c) * a.hv + h) * kChunk;
  const PrepLayout lay(a.dkp, a.dvp, sizeof(T));
  T* qs = carve<T>(smem, lay.qs);  // q, then v
  T* ks = carve<T>(smem, lay.ks);
  float* f = carve<float>(smem, lay.f);
  float* qk = carve<float>(smem, lay.a);
  T* a_hi = carve<T>(smem, lay.a);
  T* a_lo = carve<T>(smem, lay.a_lo);
  float* cum = carve<float>(smem, lay.cum);
  float* bet = carve<float>(smem, lay.bet);

  load_gates(g, beta, t0, n, h, a.hv, cum, bet);
  __syncthreads();
  prepare_rows(q, k, a, t0, n, h, vec, cum, qs, lay.ldq, ks, lay.ldk, row0, ws);
  __syncthreads();
  block_mm<false, true>(f, lay.ldf, ks, lay.ldk, ks, lay.ldk, kChunk, kChunk, a.dkp, false);
  block_mm<false, true>(qk, lay.ldf, qs, lay.ldq, ks, lay.ldk, kChunk, kChunk, a.dkp, false);
  __syncthreads();
  load_v(v, a, t0, n, h, vec, qs, lay.ldq);  // q is dead; v streams in during the solve
  decay_and_store_p(f, qk, lay.ldf, cum, bet, ws.p + row0 * kChunk);
  __syncthreads();
  const int col = threadIdx.x;
  const bool solver = col < kChunk;
  float r[kChunk];
  if (solver) invert_column(r, col, f, lay.ldf);
  __syncthreads();  // f is free: it stages the products' tiles from here on
  if (solver) store_scaled_column(r, col, bet[col] * expf(cum[col]), a_hi, a_lo, lay.lda);
  __syncthreads();
  chunk_product(ws.w + row0 * a.dkp, a.dkp, a_hi, a_lo, lay.lda, ks, lay.ldk, a.dkp, f);
  __syncthreads();
  if (solver) store_scaled_column(r, col, bet[col], a_hi, a_lo, lay.lda);
  cp_async_wait<0>();
  __syncthreads();
  chunk_product(ws.u + row0 * a.dvp, a.dvp, a_hi, a_lo, lay.lda, qs, lay.ldq, a.dvp, f);
  if (threadIdx.x == 0) ws.gl[static_cast<int64_t>(c) * a.hv + h] = expf(cum[n - 1]);
}

}  // namespace
}  // namespace splitvl
