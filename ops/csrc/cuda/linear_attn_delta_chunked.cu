// CUDA kernels: chunk-parallel gated delta rule prefill (chunks of 64 tokens), the
// UT/WY form on tensor cores. Step for step as tests/ops/test_gdn_chunked_algorithm.py:
//  1. chunk_offsets: chunks per sequence, scanned (no host sync on cu_seqlens).
//  2. prepare, one CTA per (chunk, value head), all chunks in parallel: cumulative gate,
//     l2-normalized q/k, K K^T and Q K^T (tensor cores), the UT system solved by forward
//     substitution in fp32 (a thread per right-hand-side column, held in registers), giving
//     w = A (beta k exp(cum)), u = A (beta v), qg = q exp(cum), kd = k exp(cum_last - cum),
//     p = masked (q k^T exp(cum_i - cum_j)) and exp(cum_last), into a workspace.
//  3. state pass, one CTA per (sequence, value head, 16 state columns), sequential over
//     the sequence's chunks with the fp32 state in shared memory: stores S_c (the state at
//     the chunk's start), v_new = u - w S_c, then S = exp(cum_last) S + kd^T v_new.
//  4. output, one CTA per (chunk, value head, 64 columns), all chunks in parallel:
//     o = qg S_c + p v_new.
// 16-bit inputs multiply on tensor cores (S_c rounded to the input type as a matmul
// operand, the running state kept in fp32); fp32 inputs use fp32 FMA throughout.
// Semantics: ops/reference_linear_attn.py (gated_delta_rule_chunked).
#include <c10/cuda/CUDAException.h>

#include "../check.h"
#include "block_mm.cuh"
#include "common.cuh"
#include "linear_attn_common.cuh"
#include "linear_attn_delta_chunked.cuh"
#include "linear_attn_delta_chunk_output.cuh"
#include "linear_attn_delta_chunked_layout.cuh"
#include "linear_attn_delta_state_pass.cuh"

namespace splitvl {
namespace {

// offsets[b] = chunks of sequences < b (ceil(len / kChunk) each); offsets[batch] = total.
__global__ void __launch_bounds__(kScanThreads)
    chunk_offsets_kernel(const int32_t* __restrict__ cu, int batch, int32_t* __restrict__ offsets) {
  __shared__ int32_t buf[kScanThreads];
  __shared__ int32_t carry;
  if (threadIdx.x == 0) {
    carry = 0;
    offsets[0] = 0;
  }
  for (int base = 0; base < batch; base += kScanThreads) {
    const int b = base + threadIdx.x;
    buf[threadIdx.x] = b < batch ? (cu[b + 1] - cu[b] + kChunk - 1) / kChunk : 0;
    __syncthreads();
    for (int off = 1; off < kScanThreads; off <<= 1) {  // Hillis-Steele inclusive scan
      const int32_t add = threadIdx.x >= off ? buf[threadIdx.x - off] : 0;
      __syncthreads();
      buf[threadIdx.x] += add;
      __syncthreads();
    }
    if (b < batch) offsets[b + 1] = carry + buf[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == kScanThreads - 1) carry += buf[kScanThreads - 1];
    __syncthreads();
  }
}

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

constexpr int kRowsPerWarp = kChunk / (kPrepThreads / 32);

// The q, k, v values of one warp's rows (warp, warp + 8, ...; zero past the chunk), all
// loads issued before any is used: with one prepare CTA per SM little else hides them.
struct RawRows {
  float q[kRowsPerWarp][kMaxDk / 32], k[kRowsPerWarp][kMaxDk / 32], v[kRowsPerWarp][kMaxDv / 32];
};

template <typename T>
__device__ __forceinline__ void load_raw_rows(const T* q, const T* k, const T* v, const ChunkArgs& a, int64_t t0,
                                              int n, int h, RawRows& raw) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int hq = h / (a.hv / a.hk);
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp + rr * (kPrepThreads / 32);
    const bool live = r < n;
    const int64_t t = t0 + r;
#pragma unroll
    for (int e = 0; e < kMaxDk / 32; ++e) {
      const int i = lane + 32 * e;
      const bool in = live && i < a.dk;
      raw.q[rr][e] = in ? to_float(q[t * a.q_tok + hq * a.q_head + i]) : 0.f;
      raw.k[rr][e] = in ? to_float(k[t * a.k_tok + hq * a.k_head + i]) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < kMaxDv / 32; ++e) {
      const int j = lane + 32 * e;
      raw.v[rr][e] = live && j < a.dv ? to_float(v[t * a.v_tok + h * a.v_head + j]) : 0.f;
    }
  }
}

// A warp per row: normalized q, k into shared memory (matmul operands), qg and kd into the
// workspace, the right-hand sides beta k exp(cum) | beta v into x (fp32).
template <typename T>
__device__ __forceinline__ void finish_rows(const RawRows& raw, const ChunkArgs& a, int n, int64_t row0,
                                            const float* cum, const float* bet, T* qs, T* ks, float* x, int ldk,
                                            int ldx, const ChunkWork<T>& ws) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float last = cum[n - 1];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp + rr * (kPrepThreads / 32);
    float sq = 0.f, sk = 0.f;
#pragma unroll
    for (int e = 0; e < kMaxDk / 32; ++e) {
      sq += raw.q[rr][e] * raw.q[rr][e];
      sk += raw.k[rr][e] * raw.k[rr][e];
    }
    float q_scale = a.scale, k_scale = 1.f;
    if (a.l2norm) {
      q_scale *= rsqrtf(warp_sum(sq) + kL2Eps);
      k_scale = rsqrtf(warp_sum(sk) + kL2Eps);
    }
    const float up = expf(cum[r]), down = expf(last - cum[r]), br = bet[r];
#pragma unroll
    for (int e = 0; e < kMaxDk / 32; ++e) {
      const int i = lane + 32 * e;
      if (i >= a.dkp) break;
      const float qn = raw.q[rr][e] * q_scale, kn = raw.k[rr][e] * k_scale;
      qs[r * ldk + i] = from_float<T>(qn);
      ks[r * ldk + i] = from_float<T>(kn);
      x[r * ldx + i] = br * kn * up;
      ws.qg[(row0 + r) * a.dkp + i] = from_float<T>(qn * up);
      ws.kd[(row0 + r) * a.dkp + i] = from_float<T>(kn * down);
    }
#pragma unroll
    for (int e = 0; e < kMaxDv / 32; ++e) {
      const int j = lane + 32 * e;
      if (j < a.dvp) x[r * ldx + a.dkp + j] = br * raw.v[rr][e];  // zero past dv and past n
    }
  }
}

// x <- (I + L)^-1 x for strictly lower L given transposed (lt[j * ldl + i] = L[i][j], zero for
// i <= j); a thread per column, the column in registers, eliminated column by column
// (x[i] -= L[i][j] x[j] for all i > j: independent FMAs, L read as broadcast float4). Rows
// past the chunk's length have zero right-hand sides and zero L rows, so they stay zero.
__device__ __forceinline__ void forward_substitute(float* x, int ldx, int cols, const float* lt, int ldl) {
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    float r[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) r[i] = x[i * ldx + col];
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
#pragma unroll
    for (int i = 0; i < kChunk; ++i) x[i * ldx + col] = r[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads)
    gdn_prepare_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const float* __restrict__ g, const float* __restrict__ beta,
                       const int32_t* __restrict__ cu, const int32_t* __restrict__ offsets, int batch,
                       ChunkArgs a, ChunkWork<T> ws) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int c = blockIdx.x, h = blockIdx.y;
  if (c >= offsets[batch]) return;  // the grid is an upper bound on the chunk count
  const int b = find_sequence(offsets, batch, c);
  const int64_t t0 = cu[b] + static_cast<int64_t>(c - offsets[b]) * kChunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), cu[b + 1] - t0));
  const int64_t row0 = (static_cast<int64_t>(c) * a.hv + h) * kChunk;
  const PrepLayout lay(a.dkp, a.dvp, sizeof(T));
  T* qs = carve<T>(smem, lay.qs);
  T* ks = carve<T>(smem, lay.ks);
  float* l = carve<float>(smem, lay.l);
  float* p = carve<float>(smem, lay.p);
  float* x = carve<float>(smem, lay.x);
  float* cum = carve<float>(smem, lay.cum);
  float* bet = carve<float>(smem, lay.bet);

  RawRows raw;
  load_raw_rows(q, k, v, a, t0, n, h, raw);
  load_gates(g, beta, t0, n, h, a.hv, cum, bet);
  __syncthreads();
  finish_rows(raw, a, n, row0, cum, bet, qs, ks, x, lay.ldk, lay.ldx, ws);
  __syncthreads();
  block_mm<false, true>(l, lay.ldl, ks, lay.ldk, ks, lay.ldk, kChunk, kChunk, a.dkp, false);
  block_mm<false, true>(p, lay.ldl, qs, lay.ldk, ks, lay.ldk, kChunk, kChunk, a.dkp, false);
  __syncthreads();
  // k k^T is symmetric: l[j][i] becomes L[i][j] in place, the transposed system.
  for (int idx = threadIdx.x; idx < kChunk * kChunk; idx += blockDim.x) {
    const int j = idx / kChunk, i = idx % kChunk;
    const float kk = l[j * lay.ldl + i];
    l[j * lay.ldl + i] = j < i ? bet[i] * kk * expf(cum[i] - cum[j]) : 0.f;
  }
  for (int idx = threadIdx.x; idx < kChunk * kChunk; idx += blockDim.x) {
    const int i = idx / kChunk, j = idx % kChunk;
    const float decay = j <= i ? expf(cum[i] - cum[j]) : 0.f;
    ws.p[(row0 + i) * kChunk + j] = from_float<T>(p[i * lay.ldl + j] * decay);
  }
  __syncthreads();
  forward_substitute(x, lay.ldx, a.dkp + a.dvp, l, lay.ldl);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kChunk * a.dkp; idx += blockDim.x) {
    const int r = idx / a.dkp, i = idx % a.dkp;
    ws.w[(row0 + r) * a.dkp + i] = from_float<T>(x[r * lay.ldx + i]);
  }
  for (int idx = threadIdx.x; idx < kChunk * a.dvp; idx += blockDim.x) {
    const int r = idx / a.dvp, j = idx % a.dvp;
    ws.u[(row0 + r) * a.dvp + j] = from_float<T>(x[r * lay.ldx + a.dkp + j]);
  }
  if (threadIdx.x == 0) ws.gl[static_cast<int64_t>(c) * a.hv + h] = expf(cum[n - 1]);
}

int round_up(int x, int m) { return (x + m - 1) / m * m; }

struct Smem {
  size_t prep, out;
  PassLayout pass;
};

template <typename K>
void allow_smem(K kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T>
void launch_chunked(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& g, const at::Tensor& beta, const at::Tensor& cu_seqlens,
                    at::Tensor& states, const at::Tensor& state_indices, const bool* has_init,
                    int batch, const ChunkArgs& a, const Smem& smem) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t max_chunks = (q.size(0) + kChunk - 1) / kChunk + batch;  // each sequence adds <= 1 partial
  const int64_t rows = max_chunks * a.hv * kChunk;
  const int64_t state_rows = max_chunks * a.hv * a.dkp;
  at::Tensor work = at::empty({rows * (3 * a.dkp + a.dvp + kChunk) + state_rows * a.dvp}, q.options());
  at::Tensor gl = at::empty({max_chunks * a.hv}, q.options().dtype(at::kFloat));
  at::Tensor offsets = at::empty({batch + 1}, cu_seqlens.options());
  T* base = reinterpret_cast<T*>(work.data_ptr());
  const ChunkWork<T> ws{base, base + rows * a.dkp, base + 2 * rows * a.dkp, base + 3 * rows * a.dkp,
                        base + rows * (3 * a.dkp + a.dvp), base + rows * (3 * a.dkp + a.dvp + kChunk),
                        gl.data_ptr<float>()};
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  const auto chunks = static_cast<unsigned>(max_chunks);
  chunk_offsets_kernel<<<1, kScanThreads, 0, stream>>>(cu, batch, off);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  allow_smem(gdn_prepare_kernel<T>, smem.prep);
  gdn_prepare_kernel<T><<<dim3(chunks, a.hv), kPrepThreads, smem.prep, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), g.data_ptr<float>(), beta.data_ptr<float>(), cu, off,
      batch, a, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  allow_smem(gdn_state_pass_kernel<T>, smem.pass.bytes);
  gdn_state_pass_kernel<T><<<dim3(batch, a.hv, a.dvp / kTileV), kPassThreads, smem.pass.bytes, stream>>>(
      off, states.data_ptr<float>(), state_indices.data_ptr<int32_t>(), has_init, a, ws, smem.pass.stages);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  allow_smem(gdn_chunk_output_kernel<T>, smem.out);
  const auto col_tiles = static_cast<unsigned>((a.dvp + kOutCols - 1) / kOutCols);
  gdn_chunk_output_kernel<T><<<dim3(chunks, a.hv, col_tiles), kOutThreads, smem.out, stream>>>(
      reinterpret_cast<T*>(out.data_ptr()), cu, off, batch, a, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool launch_gated_delta_rule_chunked(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                                     const at::Tensor& cu_seqlens, at::Tensor& states,
                                     const at::Tensor& state_indices, const bool* has_init,
                                     int64_t batch, bool l2norm) {
  const int dk = static_cast<int>(q.size(2)), dv = static_cast<int>(v.size(2));
  if (dk > kMaxDk || dv > kMaxDv || v.size(1) > 65535) return false;
  const int dkp = round_up(dk, 16), dvp = round_up(dv, kTileV);
  const int elem = static_cast<int>(q.element_size());
  int device = 0, max_smem = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const auto fits = [&](size_t bytes) { return bytes <= static_cast<size_t>(max_smem); };
  // Three stages leave room for one state-pass CTA per SM: right when the CTAs fit in one wave
  // (one long sequence); with more, two stages let two CTAs share an SM and hide each other.
  const int64_t pass_ctas = batch * v.size(1) * (dvp / kTileV);
  const int stages = pass_ctas > sms ? 2 : kMaxPassStages;
  Smem smem{PrepLayout(dkp, dvp, elem).bytes, OutLayout(dkp, elem).bytes, PassLayout(dkp, elem, stages)};
  while (smem.pass.stages > 1 && !fits(smem.pass.bytes)) smem.pass = PassLayout(dkp, elem, smem.pass.stages - 1);
  if (!fits(smem.prep) || !fits(smem.pass.bytes) || !fits(smem.out)) return false;
  if (batch == 0) return true;
  const ChunkArgs a{q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    static_cast<int>(q.size(1)), static_cast<int>(v.size(1)), dk, dv, dkp, dvp,
                    static_cast<int>(states.size(0)), 1.f / sqrtf(static_cast<float>(dk)), l2norm};
  SPLITVL_DISPATCH_FLOAT(q.scalar_type(), "gated_delta_rule_chunked", [&] {
    launch_chunked<scalar_t>(out, q, k, v, g, beta, cu_seqlens, states, state_indices, has_init,
                             static_cast<int>(batch), a, smem);
  });
  return true;
}

}  // namespace splitvl
