// Shapes, workspace and shared-memory layouts of the chunk-parallel gated delta rule
// kernels (linear_attn_delta_chunked.cu, linear_attn_delta_state_pass.cuh).
#pragma once

#include <cstddef>
#include <cstdint>

namespace splitvl {
namespace {

constexpr int kChunk = 64;
constexpr int kMaxDk = 128;    // q/k row in registers: kMaxDk / 32 values per lane
constexpr int kMaxDv = 256;
constexpr int kTileV = 32;     // state columns per state-pass CTA
constexpr int kPrepThreads = 256;
constexpr int kPassThreads = 128;
constexpr int kScanThreads = 1024;
constexpr float kL2Eps = 1e-6f;

struct ChunkArgs {
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head;
  int hk, hv, dk, dv, dkp, dvp, num_slots;
  float scale;
  bool l2norm;
};

// The workspace rows of (chunk c, head h) start at row (c * hv + h) * kChunk.
template <typename T>
struct ChunkWork {
  T* w;    // [rows, dkp]
  T* qg;   // [rows, dkp]
  T* kd;   // [rows, dkp]
  T* u;    // [rows, dvp]
  T* p;    // [rows, kChunk]
  float* gl;  // [chunks * hv]
};

__host__ __device__ inline size_t take(size_t& offset, size_t bytes) {
  const size_t at = offset;
  offset += (bytes + 127) / 128 * 128;
  return at;
}

// Shared-memory carving of the prepare kernel (byte offsets); elem = sizeof(T).
struct PrepLayout {
  int ldk, ldl, ldx;
  size_t qs, ks, l, p, x, cum, bet, bytes;
  __host__ __device__ PrepLayout(int dkp, int dvp, int elem)
      : ldk(dkp + 16 / elem), ldl(kChunk + 4), ldx(dkp + dvp) {
    size_t o = 0;
    qs = take(o, size_t(kChunk) * ldk * elem);
    ks = take(o, size_t(kChunk) * ldk * elem);
    l = take(o, size_t(kChunk) * ldl * 4);
    p = take(o, size_t(kChunk) * ldl * 4);
    x = take(o, size_t(kChunk) * ldx * 4);
    cum = take(o, kChunk * 4);
    bet = take(o, kChunk * 4);
    bytes = o;
  }
};

// Shared-memory carving of the state-pass kernel. The chunk tiles (w, qg, kd, u, p) have
// `stages` copies: with two, chunk i + 1 streams in while chunk i computes.
struct PassLayout {
  int ldk, ldt, ldp, lds, stages;
  size_t w, qg, kd, u, p, stage_bytes, s, sb, cb, vb, bytes;
  __host__ __device__ PassLayout(int dkp, int elem, int num_stages)
      : ldk(dkp + 16 / elem), ldt(kTileV + 16 / elem), ldp(kChunk + 16 / elem), lds(kTileV + 4),
        stages(num_stages) {
    size_t o = 0;
    w = take(o, size_t(kChunk) * ldk * elem);
    qg = take(o, size_t(kChunk) * ldk * elem);
    kd = take(o, size_t(kChunk) * ldk * elem);
    u = take(o, size_t(kChunk) * ldt * elem);
    p = take(o, size_t(kChunk) * ldp * elem);
    stage_bytes = o;
    o *= stages;
    s = take(o, size_t(dkp) * lds * 4);
    sb = take(o, size_t(dkp) * ldt * elem);
    cb = take(o, size_t(kChunk) * lds * 4);
    vb = take(o, size_t(kChunk) * ldt * elem);
    bytes = o;
  }
};

template <typename U>
__device__ __forceinline__ U* carve(unsigned char* base, size_t offset) {
  return reinterpret_cast<U*>(base + offset);
}

}  // namespace
}  // namespace splitvl
