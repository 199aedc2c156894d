// The state pass of the chunk-parallel gated delta rule: one CTA per (sequence, value
// head, kTileV state columns), sequential over the sequence's chunks, fp32 state in shared
// memory, chunk tiles streamed in with cp.async (two stages when shared memory allows).
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
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }

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

// Starts the copy of chunk c's tiles (columns v0.. of u) into stage `stage`; one commit group.
template <typename T>
__device__ __forceinline__ void load_chunk(unsigned char* smem, const PassLayout& lay, int stage,
                                           const ChunkWork<T>& ws, const ChunkArgs& a, int c, int h, int v0) {
  unsigned char* base = smem + stage * lay.stage_bytes;
  const int64_t row0 = (static_cast<int64_t>(c) * a.hv + h) * kChunk;
  copy_tile_async(carve<T>(base, lay.w), lay.ldk, ws.w + row0 * a.dkp, a.dkp, kChunk, a.dkp);
  copy_tile_async(carve<T>(base, lay.qg), lay.ldk, ws.qg + row0 * a.dkp, a.dkp, kChunk, a.dkp);
  copy_tile_async(carve<T>(base, lay.kd), lay.ldk, ws.kd + row0 * a.dkp, a.dkp, kChunk, a.dkp);
  copy_tile_async(carve<T>(base, lay.u), lay.ldt, ws.u + row0 * a.dvp + v0, a.dvp, kChunk, kTileV);
  copy_tile_async(carve<T>(base, lay.p), lay.ldp, ws.p + row0 * kChunk, kChunk, kChunk, kChunk);
  cp_async_commit();
}

template <typename T>
__global__ void __launch_bounds__(kPassThreads)
    gdn_state_pass_kernel(T* __restrict__ out, const int32_t* __restrict__ cu,
                          const int32_t* __restrict__ offsets, float* __restrict__ states,
                          const int32_t* __restrict__ slots, const bool* __restrict__ has_init,
                          ChunkArgs a, ChunkWork<T> ws, int stages) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int b = blockIdx.x, h = blockIdx.y, v0 = blockIdx.z * kTileV;
  const PassLayout lay(a.dkp, sizeof(T), stages);
  float* s = carve<float>(smem, lay.s);
  T* sb = carve<T>(smem, lay.sb);
  float* cb = carve<float>(smem, lay.cb);
  T* vb = carve<T>(smem, lay.vb);
  const int slot = slots[b];
  CUDA_KERNEL_ASSERT(slot < a.num_slots);
  const bool use_state = slot >= 0 && (has_init == nullptr || has_init[b]);
  float* slot_state =
      slot >= 0 ? states + (static_cast<int64_t>(slot) * a.hv + h) * a.dk * a.dv : nullptr;
  const int first = offsets[b], count = offsets[b + 1] - first;
  if (count > 0) load_chunk(smem, lay, 0, ws, a, first, h, v0);
  const int state_elems = a.dkp * kTileV;
  for (int idx = threadIdx.x; idx < state_elems; idx += blockDim.x) {
    const int i = idx / kTileV, col = v0 + idx % kTileV;
    const bool in = use_state && i < a.dk && col < a.dv;
    s[i * lay.lds + idx % kTileV] = in ? slot_state[static_cast<int64_t>(i) * a.dv + col] : 0.f;
  }
  for (int ci = 0; ci < count; ++ci) {
    const int c = first + ci, stage = stages == 2 ? ci & 1 : 0;
    const int64_t t0 = cu[b] + static_cast<int64_t>(ci) * kChunk;
    const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), cu[b + 1] - t0));
    if (stages == 2 && ci + 1 < count) {  // the other stage was released by the last chunk's final sync
      load_chunk(smem, lay, stage ^ 1, ws, a, c + 1, h, v0);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    unsigned char* base = smem + stage * lay.stage_bytes;
    const T* w = carve<T>(base, lay.w);
    const T* qg = carve<T>(base, lay.qg);
    const T* kd = carve<T>(base, lay.kd);
    const T* u = carve<T>(base, lay.u);
    const T* p = carve<T>(base, lay.p);
    const float gl = ws.gl[static_cast<int64_t>(c) * a.hv + h];
    for (int idx = threadIdx.x; idx < state_elems; idx += blockDim.x) {
      const int i = idx / kTileV, j = idx % kTileV;
      sb[i * lay.ldt + j] = from_float<T>(s[i * lay.lds + j]);
    }
    __syncthreads();
    block_mm<false, false>(cb, lay.lds, w, lay.ldk, sb, lay.ldt, kChunk, kTileV, a.dkp, false);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kChunk * kTileV; idx += blockDim.x) {  // v_new = u - w S
      const int r = idx / kTileV, j = idx % kTileV;
      vb[r * lay.ldt + j] = from_float<T>(to_float(u[r * lay.ldt + j]) - cb[r * lay.lds + j]);
    }
    __syncthreads();
    block_mm<false, false>(cb, lay.lds, qg, lay.ldk, sb, lay.ldt, kChunk, kTileV, a.dkp, false);
    for (int idx = threadIdx.x; idx < state_elems; idx += blockDim.x) {
      s[(idx / kTileV) * lay.lds + idx % kTileV] *= gl;
    }
    __syncthreads();
    block_mm<false, false>(cb, lay.lds, p, lay.ldp, vb, lay.ldt, kChunk, kTileV, kChunk, true);
    block_mm<true, false>(s, lay.lds, kd, lay.ldk, vb, lay.ldt, a.dkp, kTileV, kChunk, true);
    __syncthreads();
    for (int idx = threadIdx.x; idx < n * kTileV; idx += blockDim.x) {
      const int r = idx / kTileV, j = idx % kTileV;
      if (v0 + j < a.dv) out[((t0 + r) * a.hv + h) * a.dv + v0 + j] = from_float<T>(cb[r * lay.lds + j]);
    }
    __syncthreads();  // this stage's tiles and cb are free again
    if (stages == 1 && ci + 1 < count) load_chunk(smem, lay, 0, ws, a, c + 1, h, v0);
  }
  if (slot_state == nullptr) return;
  for (int idx = threadIdx.x; idx < state_elems; idx += blockDim.x) {
    const int i = idx / kTileV, col = v0 + idx % kTileV;
    if (i < a.dk && col < a.dv) slot_state[static_cast<int64_t>(i) * a.dv + col] = s[i * lay.lds + idx % kTileV];
  }
}

}  // namespace
}  // namespace splitvl
