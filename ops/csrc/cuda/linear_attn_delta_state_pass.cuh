// The state pass of the chunk-parallel gated delta rule: one CTA per (long sequence, value
// head, kTileV state columns), sequential over the sequence's chunks, fp32 state in shared
// memory, chunk tiles streamed in with cp.async (up to kMaxPassStages stages, as shared memory
// allows).
// It keeps only what the recurrence needs on the sequential path (v_new = u - w S and
// S = exp(cum_last) S + kd^T v_new, two small matmuls a chunk) and stores v_new and each
// chunk's starting state S_c; the output kernel then computes o = qg S_c + p v_new for
// all chunks in parallel.
#pragma once

#include "block_mm.cuh"
#include "common.cuh"
#include "linear_attn_delta_chunked_layout.cuh"

namespace splitvl {
namespace {

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const auto d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
// 4 bytes, through L1 (cp.async.cg takes 16-byte copies only).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  const auto d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }
// Waits until at most `pending` (0..kMaxPassStages - 1) commit groups are in flight.
__device__ __forceinline__ void cp_async_wait_at_most(int pending) {
  if (pending >= 2) {
    cp_async_wait<2>();
  } else if (pending == 1) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// rows x cols of T, asynchronously; cols * sizeof(T) and both leading dims a multiple of 16 bytes.
template <typename T>
__device__ __forceinline__ void copy_tile_async(T* dst, int ldd, const T* src, int64_t lds, int rows, int cols) {
  constexpr int kVec = kPack16<T>;
  const int units = cols / kVec;
  for (int idx = threadIdx.x; idx < rows * units; idx += blockDim.x) {
    const int r = idx / units, e = (idx % units) * kVec;
    cp_async16(dst + r * ldd + e, src + r * lds + e);
  }
}

// The 16-byte units this thread copies of every chunk's tiles, as element offsets (the same for every chunk):
// computed once, so the chunk loop issues its copies without index divisions. w and kd share one geometry.
template <typename T>
struct PassCopyPlan {
  static constexpr int kUnits = kChunk * kMaxDk / kPack16<T> / kPassThreads;
  static constexpr int kUUnits = kTileV / kPack16<T>;  // units per row of the u tile
  static_assert(kChunk * kUUnits <= kPassThreads, "a u unit per thread at most");
  int src[kUnits];  // in the chunk's [kChunk, dkp] rows; -1: past the tile
  int dst[kUnits];  // in the stage's [kChunk, ldk] tile
  int u_src, u_dst;  // in the chunk's [kChunk, dvp] rows from column v0 / the [kChunk, ldt] tile; u_src -1: none

  __device__ __forceinline__ PassCopyPlan(const PassLayout& lay, const ChunkArgs& a) {
    constexpr int kVec = kPack16<T>;
    const int units = a.dkp / kVec;
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      const int idx = static_cast<int>(threadIdx.x) + i * kPassThreads;
      const int r = idx / units, e = idx % units * kVec;
      src[i] = idx < kChunk * units ? r * a.dkp + e : -1;
      dst[i] = r * lay.ldk + e;
    }
    const int r = static_cast<int>(threadIdx.x) / kUUnits, e = static_cast<int>(threadIdx.x) % kUUnits * kVec;
    u_src = r < kChunk ? r * a.dvp + e : -1;
    u_dst = r * lay.ldt + e;
  }
};

// Starts the copy of chunk c's tiles (columns v0.. of u) and decay into stage `stage`; one commit group.
template <typename T>
__device__ __forceinline__ void load_chunk(unsigned char* smem, const PassLayout& lay, const PassCopyPlan<T>& plan,
                                           int stage, const ChunkWork<T>& ws, const ChunkArgs& a, int c, int h,
                                           int v0) {
  unsigned char* base = smem + stage * lay.stage_bytes;
  const int64_t row0 = (static_cast<int64_t>(c) * a.hv + h) * kChunk;
  const T* w = ws.w + row0 * a.dkp;
  const T* kd = ws.kd + row0 * a.dkp;
  T* w_tile = carve<T>(base, lay.w);
  T* kd_tile = carve<T>(base, lay.kd);
#pragma unroll
  for (int i = 0; i < PassCopyPlan<T>::kUnits; ++i) {
    if (plan.src[i] >= 0) {
      cp_async16(w_tile + plan.dst[i], w + plan.src[i]);
      cp_async16(kd_tile + plan.dst[i], kd + plan.src[i]);
    }
  }
  if (plan.u_src >= 0) cp_async16(carve<T>(base, lay.u) + plan.u_dst, ws.u + row0 * a.dvp + v0 + plan.u_src);
  // The decay streams in with the tiles: a plain load of it would be a memory round trip on the
  // sequential path of every chunk.
  if (threadIdx.x == 0) cp_async4(carve<float>(base, lay.gl), ws.gl + static_cast<int64_t>(c) * a.hv + h);
  cp_async_commit();
}

// rows x kTileV of T from shared memory (leading dim lds) to global (leading dim ldd), 16 bytes a thread
// among threads [first, first + count).
template <typename T>
__device__ __forceinline__ void store_tile16(T* dst, int64_t ldd, const T* src, int lds, int rows, int first,
                                             int count) {
  constexpr int kUnits = kTileV / kPack16<T>;
  for (int idx = static_cast<int>(threadIdx.x) - first; idx < rows * kUnits; idx += count) {
    const int r = idx / kUnits, e = (idx % kUnits) * kPack16<T>;
    *reinterpret_cast<uint4*>(dst + r * ldd + e) = *reinterpret_cast<const uint4*>(src + r * lds + e);
  }
}

// The state (kTileV columns from v0) from the slot, or zeros; a row per dkp.
__device__ __forceinline__ void load_state(float* s, int lds, const float* slot_state, const ChunkArgs& a,
                                           int v0) {
  for (int idx = threadIdx.x; idx < a.dkp * kTileV; idx += blockDim.x) {
    const int i = idx / kTileV, col = v0 + idx % kTileV;
    const bool in = slot_state != nullptr && i < a.dk && col < a.dv;
    s[i * lds + idx % kTileV] = in ? slot_state[static_cast<int64_t>(i) * a.dv + col] : 0.f;
  }
}

// sb <- s rounded to T (the matmul operand).
template <typename T>
__device__ __forceinline__ void round_state(T* sb, int ldt, const float* s, int lds, int dkp) {
  for (int idx = threadIdx.x; idx < dkp * kTileV; idx += blockDim.x) {
    const int i = idx / kTileV, j = idx % kTileV;
    sb[i * ldt + j] = from_float<T>(s[i * lds + j]);
  }
}

// The state pass's shared-memory tiles besides the chunk stages.
template <typename T>
struct PassTiles {
  float* s;    // [dkp, lds] the running state (fp32)
  T* sb;       // [dkp, ldt] s rounded to T: S_c, the matmul operand
  float* cb;   // [kChunk, lds] w S over the first half of Dk
  float* cb2;  // [kChunk, lds] w S over the second half
  T* vb;       // [kChunk, ldt] v_new
  __device__ __forceinline__ PassTiles(unsigned char* smem, const PassLayout& lay)
      : s(carve<float>(smem, lay.s)),
        sb(carve<T>(smem, lay.sb)),
        cb(carve<float>(smem, lay.cb)),
        cb2(carve<float>(smem, lay.cb2)),
        vb(carve<T>(smem, lay.vb)) {}
};

// One chunk's step on tiles complete in `stage` (sb = S_c): stores S_c and v_new = u - w S_c,
// then S = exp(cum_last) S + kd^T v_new. Ends with the block synced and sb = the next S_c.
template <typename T>
__device__ __forceinline__ void pass_chunk(unsigned char* stage, const PassLayout& lay, const PassTiles<T>& t,
                                           const ChunkWork<T>& ws, const ChunkArgs& a, int c, int h, int v0) {
  const int64_t row0 = (static_cast<int64_t>(c) * a.hv + h) * kChunk;
  const T* w = carve<T>(stage, lay.w);
  const T* kd = carve<T>(stage, lay.kd);
  const T* u = carve<T>(stage, lay.u);
  const float gl = *carve<const float>(stage, lay.gl);
  const int half = a.dkp / 32 * 16;  // a multiple of 16 (zero at Dk 16: the second half does it all)
  // w S in two halves of Dk on four warps each (half as many dependent tensor-core steps).
  if (threadIdx.x < 32 * kPassMmWarps) {
    block_mm<false, false>(t.cb, lay.lds, w, lay.ldk, t.sb, lay.ldt, kChunk, kTileV, half, false, 0, kPassMmWarps);
  } else {
    block_mm<false, false>(t.cb2, lay.lds, w + half, lay.ldk, t.sb + half * lay.ldt, lay.ldt, kChunk, kTileV,
                           a.dkp - half, false, kPassMmWarps, kPassMmWarps);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kChunk * kTileV; idx += blockDim.x) {  // v_new = u - w S
    const int r = idx / kTileV, j = idx % kTileV;
    const float ws_rj = t.cb[r * lay.lds + j] + t.cb2[r * lay.lds + j];
    t.vb[r * lay.ldt + j] = from_float<T>(to_float(u[r * lay.ldt + j]) - ws_rj);
  }
  store_tile16(ws.sc + (static_cast<int64_t>(c) * a.hv + h) * a.dkp * a.dvp + v0, a.dvp, t.sb, lay.ldt, a.dkp, 0,
               kPassThreads);  // S_c for the output kernel
  __syncthreads();
  store_tile16(ws.u + row0 * a.dvp + v0, a.dvp, t.vb, lay.ldt, kChunk, 0, kPassThreads);  // u is dead: v_new
  block_mm<true, false>(t.s, lay.lds, kd, lay.ldk, t.vb, lay.ldt, a.dkp, kTileV, kChunk, true, 0, 0, gl);
  __syncthreads();  // this stage's tiles are free again, s is the next chunk's state
  round_state(t.sb, lay.ldt, t.s, lay.lds, a.dkp);
}

// Sequence b's pass over its chunks for value head h, columns v0 .. v0 + kTileV: state from the
// slot (or zeros), final state back to it.
template <typename T>
__device__ __forceinline__ void pass_sequence(unsigned char* smem, const PassLayout& lay, const PassTiles<T>& t,
                                              int b, int h, int v0, const int32_t* offsets, float* states,
                                              const int32_t* slots, const bool* has_init, const ChunkArgs& a,
                                              const ChunkWork<T>& ws) {
  const int slot = slots[b];
  CUDA_KERNEL_ASSERT(slot < a.num_slots);
  const bool use_state = slot >= 0 && (has_init == nullptr || has_init[b]);
  float* slot_state =
      slot >= 0 ? states + (static_cast<int64_t>(slot) * a.hv + h) * a.dk * a.dv : nullptr;
  const int first = offsets[b], count = offsets[b + 1] - first, stages = lay.stages;
  const PassCopyPlan<T> plan(lay, a);
  // Chunk i streams into stage i % stages, stages - 1 chunks ahead of the one computing; every
  // iteration commits one group (empty past the end) so the wait count stays stages - 1.
  for (int ci = 0; ci < stages - 1; ++ci) {
    if (ci < count) {
      load_chunk(smem, lay, plan, ci, ws, a, first + ci, h, v0);
    } else {
      cp_async_commit();
    }
  }
  load_state(t.s, lay.lds, use_state ? slot_state : nullptr, a, v0);
  __syncthreads();
  round_state(t.sb, lay.ldt, t.s, lay.lds, a.dkp);
  for (int ci = 0; ci < count; ++ci) {
    const int ahead = ci + stages - 1;
    // The stage of chunk `ahead` was released by the last chunk's final sync.
    if (ahead < count) {
      load_chunk(smem, lay, plan, ahead % stages, ws, a, first + ahead, h, v0);
    } else {
      cp_async_commit();
    }
    cp_async_wait_at_most(stages - 1);
    __syncthreads();  // the chunk's tiles and sb = S_c are complete
    pass_chunk(smem + ci % stages * lay.stage_bytes, lay, t, ws, a, first + ci, h, v0);
  }
  cp_async_wait<0>();  // only empty groups can be left
  __syncthreads();
  if (slot_state == nullptr) return;
  for (int idx = threadIdx.x; idx < a.dkp * kTileV; idx += blockDim.x) {
    const int i = idx / kTileV, col = v0 + idx % kTileV;
    if (i < a.dk && col < a.dv) slot_state[static_cast<int64_t>(i) * a.dv + col] = t.s[i * lay.lds + idx % kTileV];
  }
}

// Grid: x = value head * state tiles + tile, y strides over the ranks of the long sequences
// (longs[0 .. longs[batch]), chunk_offsets_kernel).
template <typename T>
__global__ void __launch_bounds__(kPassThreads)
    gdn_state_pass_kernel(const int32_t* __restrict__ offsets, const int32_t* __restrict__ longs, int batch,
                          float* __restrict__ states, const int32_t* __restrict__ slots,
                          const bool* __restrict__ has_init, ChunkArgs a, ChunkWork<T> ws, int stages) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tiles = a.dvp / kTileV;
  const int h = static_cast<int>(blockIdx.x) / tiles, v0 = static_cast<int>(blockIdx.x) % tiles * kTileV;
  const PassLayout lay(a.dkp, sizeof(T), stages);
  const PassTiles<T> t(smem, lay);
  const int count = longs[batch];
  for (int rank = blockIdx.y; rank < count; rank += gridDim.y) {
    pass_sequence(smem, lay, t, longs[rank], h, v0, offsets, states, slots, has_init, a, ws);
    __syncthreads();  // the next sequence overwrites s
  }
}

}  // namespace
}  // namespace splitvl
