// Shapes, workspace and shared-memory layouts of the chunk-parallel gated delta rule
// kernels (linear_attn_delta_chunked.cu, linear_attn_delta_state_pass.cuh,
// linear_attn_delta_chunk_output.cuh).
#pragma once

#include <cstddef>
#include <cstdint>

namespace splitvl {
namespace {

constexpr int kChunk = 64;
constexpr int kMaxDk = 128;    // q/k row in registers: kMaxDk / 32 values per lane
constexpr int kMaxDv = 256;
constexpr int kTileV = 16;     // state columns per state-pass CTA: 128 CTAs at 16 heads x Dv 128
constexpr int kOutCols = 64;   // output columns per output CTA
constexpr int kPrepThreads = 128;
constexpr int kPrepCtasPerSm = 3;  // prepare CTAs an SM holds at Dk = Dv = 128 in 16 bits (register cap 168)
constexpr int kPassThreads = 256;  // 8 warps: w S split in two halves of Dk, 4 warps each
constexpr int kPassMmWarps = 4;
constexpr int kOutThreads = 256;
constexpr int kMaxPassStages = 3;  // chunks in flight in the state pass (one CTA per SM at the 0.8B shape)
constexpr int kScanThreads = 1024;
constexpr float kL2Eps = 1e-6f;

struct ChunkArgs {
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head;
  int hk, hv, dk, dv, dkp, dvp, num_slots;
  float scale;
  bool l2norm;
};

// The workspace rows of (chunk c, head h) start at row (c * hv + h) * kChunk; its state
// S_c (the state at the chunk's start, a matmul operand of the output kernel) at row
// (c * hv + h) * dkp of sc.
template <typename T>
struct ChunkWork {
  T* w;    // [rows, dkp]
  T* qg;   // [rows, dkp]
  T* kd;   // [rows, dkp]
  T* u;    // [rows, dvp]: u from prepare, overwritten in place by v_new in the state pass
  T* p;    // [rows, kChunk]
  T* sc;   // [chunks * hv * dkp, dvp]
  float* gl;  // [chunks * hv]
};

__host__ __device__ inline size_t take(size_t& offset, size_t bytes) {
  const size_t at = offset;
  offset += (bytes + 127) / 128 * 128;
  return at;
}

// Shared-memory carving of the prepare kernel (byte offsets); elem = sizeof(T). qs holds q, then v; f holds K K^T,
// then L^T, then the products' fp32 staging tiles; a holds Q K^T in fp32, then A's high and low parts (a, a_lo).
struct PrepLayout {
  int ldq, ldk, ldf, lda;
  size_t qs, ks, f, a, a_lo, cum, bet, bytes;
  __host__ __device__ PrepLayout(int dkp, int dvp, int elem)
      : ldq((dkp > dvp ? dkp : dvp) + 16 / elem), ldk(dkp + 16 / elem), ldf(kChunk + 4), lda(kChunk + 16 / elem) {
    size_t o = 0;
    qs = take(o, size_t(kChunk) * ldq * elem);
    ks = take(o, size_t(kChunk) * ldk * elem);
    f = take(o, size_t(kChunk) * ldf * 4);
    const size_t part = size_t(kChunk) * lda * elem, qk = size_t(kChunk) * ldf * 4;
    a = take(o, 2 * part > qk ? 2 * part : qk);
    a_lo = a + part;
    cum = take(o, kChunk * 4);
    bet = take(o, kChunk * 4);
    bytes = o;
  }
};

// Shared-memory carving of the state-pass kernel. The chunk tiles (w, kd, u) and the chunk's
// decay exp(cum_last) (gl) have `stages` copies: with two, chunk i + 1 streams in while chunk i
// computes.
struct PassLayout {
  int ldk, ldt, lds, stages;
  size_t w, kd, u, gl, stage_bytes, s, sb, cb, cb2, vb, bytes;
  __host__ __device__ PassLayout(int dkp, int elem, int num_stages)
      : ldk(dkp + 16 / elem), ldt(kTileV + 16 / elem), lds(kTileV + 4), stages(num_stages) {
    size_t o = 0;
    w = take(o, size_t(kChunk) * ldk * elem);
    kd = take(o, size_t(kChunk) * ldk * elem);
    u = take(o, size_t(kChunk) * ldt * elem);
    gl = take(o, 4);
    stage_bytes = o;
    o *= stages;
    s = take(o, size_t(dkp) * lds * 4);
    sb = take(o, size_t(dkp) * ldt * elem);
    cb = take(o, size_t(kChunk) * lds * 4);
    cb2 = take(o, size_t(kChunk) * lds * 4);
    vb = take(o, size_t(kChunk) * ldt * elem);
    bytes = o;
  }
};

// Shared-memory carving of the output kernel: qg, p, S_c and v_new tiles, fp32 output.
struct OutLayout {
  int ldk, ldp, ldo, ldc;
  size_t qg, p, sc, vn, cb, bytes;
  __host__ __device__ OutLayout(int dkp, int elem)
      : ldk(dkp + 16 / elem), ldp(kChunk + 16 / elem), ldo(kOutCols + 16 / elem), ldc(kOutCols + 4) {
    size_t o = 0;
    qg = take(o, size_t(kChunk) * ldk * elem);
    p = take(o, size_t(kChunk) * ldp * elem);
    sc = take(o, size_t(dkp) * ldo * elem);
    vn = take(o, size_t(kChunk) * ldo * elem);
    cb = take(o, size_t(kChunk) * ldc * 4);
    bytes = o;
  }
};

template <typename U>
__device__ __forceinline__ U* carve(unsigned char* base, size_t offset) {
  return reinterpret_cast<U*>(base + offset);
}

}  // namespace
}  // namespace splitvl
