// The output of the chunk-parallel gated delta rule: o = qg S_c + p v_new for every chunk,
// one CTA per (chunk, value head, kOutCols output columns), all in parallel once the state
// pass has stored each chunk's starting state S_c and v_new.
#pragma once

#include "block_mm.cuh"
#include "common.cuh"
#include "linear_attn_common.cuh"
#include "linear_attn_delta_chunked_layout.cuh"
#include "linear_attn_delta_state_pass.cuh"

namespace splitvl {
namespace {

template <typename T>
__global__ void __launch_bounds__(kOutThreads)
    gdn_chunk_output_kernel(T* __restrict__ out, const int32_t* __restrict__ cu,
                            const int32_t* __restrict__ offsets, int batch, ChunkArgs a, ChunkWork<T> ws) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int c = blockIdx.x, h = blockIdx.y, o0 = blockIdx.z * kOutCols;
  if (c >= offsets[batch]) return;  // the grid is an upper bound on the chunk count
  const int b = find_sequence(offsets, batch, c);
  const int64_t t0 = cu[b] + static_cast<int64_t>(c - offsets[b]) * kChunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), cu[b + 1] - t0));
  const int cols = min(kOutCols, a.dvp - o0);  // a multiple of 16
  const int64_t row0 = (static_cast<int64_t>(c) * a.hv + h) * kChunk;
  const OutLayout lay(a.dkp, sizeof(T));
  T* qg = carve<T>(smem, lay.qg);
  T* p = carve<T>(smem, lay.p);
  T* sc = carve<T>(smem, lay.sc);
  T* vn = carve<T>(smem, lay.vn);
  float* cb = carve<float>(smem, lay.cb);
  copy_tile_async(qg, lay.ldk, ws.qg + row0 * a.dkp, a.dkp, kChunk, a.dkp);
  copy_tile_async(p, lay.ldp, ws.p + row0 * kChunk, kChunk, kChunk, kChunk);
  copy_tile_async(sc, lay.ldo, ws.sc + (static_cast<int64_t>(c) * a.hv + h) * a.dkp * a.dvp + o0, a.dvp, a.dkp,
                  cols);
  copy_tile_async(vn, lay.ldo, ws.u + row0 * a.dvp + o0, a.dvp, kChunk, cols);  // v_new (state pass)
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  block_mm<false, false>(cb, lay.ldc, qg, lay.ldk, sc, lay.ldo, kChunk, cols, a.dkp, false);
  __syncthreads();
  block_mm<false, false>(cb, lay.ldc, p, lay.ldp, vn, lay.ldo, kChunk, cols, kChunk, true);
  __syncthreads();
  for (int idx = threadIdx.x; idx < n * cols; idx += blockDim.x) {
    const int r = idx / cols, j = idx % cols;
    if (o0 + j < a.dv) out[((t0 + r) * a.hv + h) * a.dv + o0 + j] = from_float<T>(cb[r * lay.ldc + j]);
  }
}

}  // namespace
}  // namespace splitvl
