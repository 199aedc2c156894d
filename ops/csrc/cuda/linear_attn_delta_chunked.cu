// CUDA kernels: chunk-parallel gated delta rule prefill (chunks of 64 tokens), the
// UT/WY form on tensor cores. Step for step as tests/ops/test_gdn_chunked_algorithm.py:
//  1. chunk_offsets: chunks per sequence, scanned (no host sync on cu_seqlens), and the list of
//     the sequences longer than kChunkedShortLen tokens: only those run here (a mixed step's
//     decode rows go to the sequential kernel, linear_attn_delta.cu).
//  2. prepare (linear_attn_delta_prepare.cuh), one CTA per (chunk, value head), all chunks
//     in parallel, several per SM: cumulative gate, l2-normalized q/k, K K^T and Q K^T (tensor
//     cores), the UT inverse A = (I + L)^-1 in fp32 (a thread per column, in registers), giving
//     w = A (beta k exp(cum)), u = A (beta v) (tensor cores), qg = q exp(cum),
//     kd = k exp(cum_last - cum), p = masked (q k^T exp(cum_i - cum_j)) and exp(cum_last),
//     into a workspace.
//  3. state pass, one CTA per (long sequence, value head, 16 state columns), sequential over
//     the sequence's chunks with the fp32 state in shared memory: stores S_c (the state at
//     the chunk's start), v_new = u - w S_c, then S = exp(cum_last) S + kd^T v_new.
//  4. output, one CTA per (chunk, value head, 64 columns), all chunks in parallel:
//     o = qg S_c + p v_new.
// 16-bit inputs multiply on tensor cores (S_c rounded to the input type as a matmul
// operand, the running state kept in fp32); fp32 inputs use fp32 FMA throughout.
// Semantics: ops/reference_linear_attn.py (gated_delta_rule_chunked).
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "../check.h"
#include "block_mm.cuh"
#include "common.cuh"
#include "linear_attn_common.cuh"
#include "linear_attn_delta_chunked.cuh"
#include "linear_attn_delta_chunk_output.cuh"
#include "linear_attn_delta_chunked_layout.cuh"
#include "linear_attn_delta_prepare.cuh"
#include "linear_attn_delta_state_pass.cuh"

namespace splitvl {
namespace {

// Over the sequences longer than short_len (the others have no chunks: the sequential kernel runs
// them): offsets[b] = chunks of such sequences < b (ceil(len / kChunk) each), offsets[batch] = total;
// longs[0 .. n) = their indices in order, longs[batch] = n (the state pass's CTAs take them by rank).
__global__ void __launch_bounds__(kScanThreads)
    chunk_offsets_kernel(const int32_t* __restrict__ cu, int batch, int short_len, int32_t* __restrict__ offsets,
                         int32_t* __restrict__ longs) {
  __shared__ int32_t chunks[kScanThreads], ranks[kScanThreads];
  __shared__ int32_t carry_chunks, carry_longs;
  if (threadIdx.x == 0) {
    carry_chunks = carry_longs = 0;
    offsets[0] = 0;
  }
  for (int base = 0; base < batch; base += kScanThreads) {
    const int b = base + threadIdx.x;
    const int len = b < batch ? cu[b + 1] - cu[b] : 0;
    const bool is_long = b < batch && len > short_len;
    chunks[threadIdx.x] = is_long ? (len + kChunk - 1) / kChunk : 0;
    ranks[threadIdx.x] = is_long ? 1 : 0;
    __syncthreads();
    for (int off = 1; off < kScanThreads; off <<= 1) {  // Hillis-Steele inclusive scans
      const bool take = threadIdx.x >= off;
      const int32_t add_chunks = take ? chunks[threadIdx.x - off] : 0;
      const int32_t add_ranks = take ? ranks[threadIdx.x - off] : 0;
      __syncthreads();
      chunks[threadIdx.x] += add_chunks;
      ranks[threadIdx.x] += add_ranks;
      __syncthreads();
    }
    if (b < batch) offsets[b + 1] = carry_chunks + chunks[threadIdx.x];
    if (is_long) longs[carry_longs + ranks[threadIdx.x] - 1] = b;
    __syncthreads();
    if (threadIdx.x == kScanThreads - 1) {
      carry_chunks += chunks[kScanThreads - 1];
      carry_longs += ranks[kScanThreads - 1];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) longs[batch] = carry_longs;
}

int round_up(int x, int m) { return (x + m - 1) / m * m; }

struct Smem {
  size_t prep, out;
  PassLayout pass;
};

// Launch sizes known on the host without reading cu_seqlens: at most `longs` sequences are longer
// than short_len tokens (each holds short_len + 1 of the tokens), so the chunk count is at most
// ceil(tokens / kChunk) + longs (each adds <= 1 partial chunk).
// The state pass's grid rows (long sequences in flight, each CTA striding over the ranks) stop at
// four CTAs per SM: two fit at once, so more would only queue, and a loose bound (decode rows)
// would launch thousands of CTAs that exit at once.
struct ChunkGrid {
  int short_len;
  int64_t longs, max_chunks;
  ChunkGrid(int64_t tokens, int64_t batch, int short_len_)
      : short_len(short_len_),
        longs(std::min<int64_t>(batch, tokens / (short_len_ + 1))),
        max_chunks((tokens + kChunk - 1) / kChunk + longs) {}
  unsigned pass_rows(int64_t ctas_per_sequence, int sms) const {
    const int64_t cap = std::max<int64_t>(1, 4 * static_cast<int64_t>(sms) / ctas_per_sequence);
    return static_cast<unsigned>(std::min<int64_t>({longs, cap, 65535}));
  }
};

template <typename K>
void allow_smem(K kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Whether the prepare kernel may read q, k, v rows 16 bytes at a time: rows of whole 8-element groups, aligned.
bool vectorizable(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const ChunkArgs& a) {
  const int64_t pack = 16 / q.element_size();
  const bool strides = a.q_tok % pack == 0 && a.q_head % pack == 0 && a.k_tok % pack == 0 && a.k_head % pack == 0 &&
                       a.v_tok % pack == 0 && a.v_head % pack == 0;
  return a.dk % 8 == 0 && a.dv % 8 == 0 && strides && is_aligned16(q.data_ptr()) && is_aligned16(k.data_ptr()) &&
         is_aligned16(v.data_ptr());
}

template <typename T>
void launch_chunked(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& g, const at::Tensor& beta, const at::Tensor& cu_seqlens,
                    at::Tensor& states, const at::Tensor& state_indices, const bool* has_init,
                    int batch, const ChunkArgs& a, const Smem& smem, const ChunkGrid& grid, int sms) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = grid.max_chunks * a.hv * kChunk;
  const int64_t state_rows = grid.max_chunks * a.hv * a.dkp;
  at::Tensor work = at::empty({rows * (3 * a.dkp + a.dvp + kChunk) + state_rows * a.dvp}, q.options());
  at::Tensor gl = at::empty({grid.max_chunks * a.hv}, q.options().dtype(at::kFloat));
  at::Tensor offsets = at::empty({2 * (batch + 1)}, cu_seqlens.options());  // offsets, then longs
  T* base = reinterpret_cast<T*>(work.data_ptr());
  const ChunkWork<T> ws{base, base + rows * a.dkp, base + 2 * rows * a.dkp, base + 3 * rows * a.dkp,
                        base + rows * (3 * a.dkp + a.dvp), base + rows * (3 * a.dkp + a.dvp + kChunk),
                        gl.data_ptr<float>()};
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  int32_t* longs = off + batch + 1;
  const auto chunks = static_cast<unsigned>(grid.max_chunks);
  chunk_offsets_kernel<<<1, kScanThreads, 0, stream>>>(cu, batch, grid.short_len, off, longs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  allow_smem(gdn_prepare_kernel<T>, smem.prep);
  gdn_prepare_kernel<T><<<dim3(chunks, a.hv), kPrepThreads, smem.prep, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), g.data_ptr<float>(), beta.data_ptr<float>(), cu, off,
      batch, a, ws, vectorizable(q, k, v, a));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A CTA per (value head, state tile) and long sequence, the tiles of one head next to each other
  // (they read the same w and kd) and the sequences' ranks slowest, so the CTAs of the long sequences
  // start first and those past the actual count exit at once.
  allow_smem(gdn_state_pass_kernel<T>, smem.pass.bytes);
  const int64_t pass_ctas = static_cast<int64_t>(a.hv) * (a.dvp / kTileV);
  const dim3 pass_grid(static_cast<unsigned>(pass_ctas), grid.pass_rows(pass_ctas, sms));
  gdn_state_pass_kernel<T><<<pass_grid, kPassThreads, smem.pass.bytes, stream>>>(
      off, longs, batch, states.data_ptr<float>(), state_indices.data_ptr<int32_t>(), has_init, a, ws,
      smem.pass.stages);
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
                                     int64_t batch, bool l2norm, int short_len) {
  const int dk = static_cast<int>(q.size(2)), dv = static_cast<int>(v.size(2));
  if (dk > kMaxDk || dv > kMaxDv || v.size(1) > 65535) return false;
  const int dkp = round_up(dk, 16), dvp = round_up(dv, kTileV);
  const int elem = static_cast<int>(q.element_size());
  int device = 0, max_smem = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const auto fits = [&](size_t bytes) { return bytes <= static_cast<size_t>(max_smem); };
  const ChunkGrid grid(q.size(0), batch, short_len);
  // Three stages leave room for one state-pass CTA per SM: right when the CTAs fit in one wave
  // (one long sequence); with more, two stages let two CTAs share an SM and hide each other.
  const int64_t pass_ctas = grid.longs * v.size(1) * (dvp / kTileV);
  const int stages = pass_ctas > sms ? 2 : kMaxPassStages;
  Smem smem{PrepLayout(dkp, dvp, elem).bytes, OutLayout(dkp, elem).bytes, PassLayout(dkp, elem, stages)};
  while (smem.pass.stages > 1 && !fits(smem.pass.bytes)) smem.pass = PassLayout(dkp, elem, smem.pass.stages - 1);
  if (!fits(smem.prep) || !fits(smem.pass.bytes) || !fits(smem.out)) return false;
  if (grid.longs == 0) return true;  // every sequence is short: nothing to run here
  const ChunkArgs a{q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    static_cast<int>(q.size(1)), static_cast<int>(v.size(1)), dk, dv, dkp, dvp,
                    static_cast<int>(states.size(0)), 1.f / sqrtf(static_cast<float>(dk)), l2norm};
  SPLITVL_DISPATCH_FLOAT(q.scalar_type(), "gated_delta_rule_chunked", [&] {
    launch_chunked<scalar_t>(out, q, k, v, g, beta, cu_seqlens, states, state_indices, has_init,
                             static_cast<int>(batch), a, smem, grid, sms);
  });
  return true;
}

}  // namespace splitvl
