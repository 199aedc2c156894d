// add_rms_norm_linear_small: fused_add_rms_norm's residual add and RMSNorm folded into
// linear_small's weight stream, one launch at decode (ops/reference.py).
//
// Grid, slabs, K splits, stream order and cluster reduction are linear_small's
// (dense_gemv.cuh), so `out` equals linear_small of fused_add_rms_norm's output bit for bit.
// No grid barrier: every CTA first computes the inverse RMS of its 16-row block itself (a
// row is a few KB of x and residual, read from L2), replaying the order in which
// fused_add_rms_norm's kernel (layernorm.cu) sums: that kernel gives a row `norm_threads`
// threads (one warp at <= 128 packs), thread v sums the squares of packs v, v + threads, ...
// (each pack's 8 summed first, norm_common.cuh), then a warp butterfly, then (more than one
// warp) a butterfly over the warp sums; here warp w of a CTA takes the replayed warps w,
// w + 4, ... with the same lanes. The stream then rebuilds each A fragment from x and the
// residual: (x + residual) rounded, scaled, weighted and rounded (norm_common.cuh), the
// values fused_add_rms_norm writes. The CTA at split 0 of slab 0 of a row block writes the
// block's new residual to `residual_out`: out of place, since every CTA reads the old one.
//
// PDL: each warp's first round of weight loads and an L2 prefetch of the slab's next rounds
// are issued before pdl_wait(); x and the residual are read after it.
//
// fp32, K % 8 != 0, unaligned rows or norm weight, and N = 0 take fused_add_rms_norm on a
// copy, then linear_small (the same result, three launches).
#include <cstring>

#include "../linear_small.h"
#include "dense_gemv.cuh"
#include "norm_common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

using namespace gemv;

constexpr int kPack = 8;        // the 16-byte packs of fused_add_rms_norm's kernel (16-bit T)
constexpr int kNormBatch = 4;   // replayed warps a warp loads at once
constexpr int kPrefetchChunks = 2 * kWarps * kUnroll;  // L2 prefetch: the two rounds after the first

template <typename T, typename W>
struct NormGemvArgs {
  DenseArgs<T> d;       // d.x: the un-normalized x
  const T* res;         // [M, K], rows res_stride apart
  T* res_out;           // [M, K] contiguous
  const W* norm_w;      // [K]
  int64_t res_stride;
  float eps;
  int norm_threads;     // fused_add_rms_norm's threads per row: 32 (warp mode) or a multiple
  bool norm_warp;       // its warp mode: the row sum is one warp's butterfly
};

__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// x + residual rounded to T: the new residual, which fused_add_rms_norm normalizes.
template <typename T>
__device__ __forceinline__ Pack<T, kPack> add_rounded(uint4 xw, uint4 rw) {
  Pack<T, kPack> x, r;
  memcpy(&x, &xw, sizeof(x));
  memcpy(&r, &rw, sizeof(r));
#pragma unroll
  for (int j = 0; j < kPack; ++j) x.v[j] = from_float<T>(to_float(x.v[j]) + to_float(r.v[j]));
  return x;
}

template <typename W>
__device__ __forceinline__ Pack<W, kPack> load_norm_weight(const W* w) {
  Pack<W, kPack> v;
  uint4 words[sizeof(v) / 16];
#pragma unroll
  for (int i = 0; i < int(sizeof(v) / 16); ++i) words[i] = __ldg(reinterpret_cast<const uint4*>(w) + i);
  memcpy(&v, words, sizeof(v));
  return v;
}

// fused_add_rms_norm's output for elements k .. k + 7 of one row, as an A fragment's 16 bytes.
template <typename T, typename W>
__device__ __forceinline__ uint4 normed_pack(const T* x, const T* res, const Pack<W, kPack>& w, float inv) {
  const Pack<T, kPack> s = add_rounded<T>(load_cached(x), load_cached(res));
  Pack<T, kPack> y;
#pragma unroll
  for (int j = 0; j < kPack; ++j) y.v[j] = scale_weight<T, W>(to_float(s.v[j]), inv, w.v[j]);
  uint4 out;
  memcpy(&out, &y, sizeof(out));
  return out;
}

// inv[t] = fused_add_rms_norm's inverse RMS of row row0 + t (t < rows), summed in its order
// (header comment); `writes` also stores the block's new residual. Ends with a block barrier.
template <typename T, typename W>
__device__ void block_inv_rms(const NormGemvArgs<T, W>& p, int row0, int rows, bool writes,
                              float (&warp_sums)[16][32], float (&inv)[16]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nvec = p.d.k_dim / kPack, nthr = p.norm_threads, vwarps = nthr / 32;
  const int pairs = rows * vwarps;  // (row, replayed warp)
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const auto x_at = [&](int t, int i) { return p.d.x + int64_t(row0 + t) * p.d.x_stride + kPack * i; };
  const auto res_at = [&](int t, int i) { return p.res + int64_t(row0 + t) * p.res_stride + kPack * i; };
  const auto keep = [&](int t, int i, const Pack<T, kPack>& s) {
    if (writes) *reinterpret_cast<Pack<T, kPack>*>(p.res_out + int64_t(row0 + t) * p.d.k_dim + kPack * i) = s;
  };
  for (int base = warp; base < pairs; base += kWarps * kNormBatch) {
    uint4 xs[kNormBatch], rs[kNormBatch];
#pragma unroll
    for (int b = 0; b < kNormBatch; ++b) {
      const int pair = base + b * kWarps;
      const int t = pair / vwarps, i = (pair % vwarps) * 32 + lane;
      const bool in = pair < pairs && i < nvec;
      xs[b] = in ? load_cached(x_at(t, i)) : zero;
      rs[b] = in ? load_cached(res_at(t, i)) : zero;
    }
#pragma unroll
    for (int b = 0; b < kNormBatch; ++b) {
      const int pair = base + b * kWarps;  // the same for the whole warp
      if (pair >= pairs) break;
      const int t = pair / vwarps, v = (pair % vwarps) * 32 + lane;
      float ss = 0.f;
      if (v < nvec) {
        const Pack<T, kPack> s = add_rounded<T>(xs[b], rs[b]);
        keep(t, v, s);
        ss += sum_squares(s);
        for (int i = v + nthr; i < nvec; i += nthr) {  // rows over 1024 packs
          const Pack<T, kPack> s2 = add_rounded<T>(load_cached(x_at(t, i)), load_cached(res_at(t, i)));
          keep(t, i, s2);
          ss += sum_squares(s2);
        }
      }
      ss = warp_sum(ss);
      if (lane == 0) warp_sums[t][pair % vwarps] = ss;
    }
  }
  __syncthreads();
  for (int t = warp; t < rows; t += kWarps) {
    const float ss = p.norm_warp ? warp_sums[t][0] : warp_sum(lane < vwarps ? warp_sums[t][lane] : 0.f);
    if (lane == 0) inv[t] = rsqrtf(ss / p.d.k_dim + p.eps);
  }
  __syncthreads();
}

// linear_small's stream (gemv_stream.cuh stream_k) with A rebuilt from x and the residual.
// The first round's weights `c` were loaded before pdl_wait().
template <typename T, typename W>
__device__ __forceinline__ void stream_normed(float (&acc)[kTiles][4], Chunk (&c)[kUnroll],
                                              const T* const (&w_rows)[kTiles], const NormGemvArgs<T, W>& p,
                                              int row0, const float (&inv)[16], int begin, int end) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const bool has0 = row0 + g < p.d.m, has1 = row0 + g + 8 < p.d.m;
  const T* x0 = p.d.x + int64_t(row0 + g) * p.d.x_stride;
  const T* x1 = p.d.x + int64_t(row0 + g + 8) * p.d.x_stride;
  const T* r0 = p.res + int64_t(row0 + g) * p.res_stride;
  const T* r1 = p.res + int64_t(row0 + g + 8) * p.res_stride;
  const float inv0 = has0 ? inv[g] : 0.f, inv1 = has1 ? inv[g + 8] : 0.f;
  for (int first = begin + warp; first < end; first += kWarps * kUnroll) {
    if (first != begin + warp) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int chunk = first + u * kWarps;
        const int k = chunk * kChunk + 8 * t4;
        const bool in = chunk < end && k < p.d.k_dim;
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt)
          c[u].w[nt] = in && w_rows[nt] != nullptr ? load_stream(w_rows[nt] + k) : zero;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int chunk = first + u * kWarps;
      const int k = chunk * kChunk + 8 * t4;
      const bool in = chunk < end && k < p.d.k_dim;
      if (in && (has0 || has1)) {
        const Pack<W, kPack> w = load_norm_weight(p.norm_w + k);
        c[u].a[0] = has0 ? normed_pack<T, W>(x0 + k, r0 + k, w, inv0) : zero;
        c[u].a[1] = has1 ? normed_pack<T, W>(x1 + k, r1 + k, w, inv1) : zero;
      } else {
        c[u].a[0] = c[u].a[1] = zero;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) mma_chunk<T>(acc, c[u]);
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kWarps * 32, 4) add_norm_gemv_kernel(NormGemvArgs<T, W> p) {
  __shared__ __align__(16) float partial[kWarps * kFrag];
  __shared__ float warp_sums[16][32];
  __shared__ float inv[16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int rank = blockIdx.x;  // the cluster spans grid x exactly: rank = blockIdx.x
  const int row0 = blockIdx.z * 16, col0 = blockIdx.y * kSlabCols<false>;
  const int rows = min(16, p.d.m - row0);
  const T* w_rows[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    const int row = tile_weight_row<false>(nt, g, col0, p.d.n);
    w_rows[nt] = row >= 0 ? p.d.w + int64_t(row) * p.d.k_dim : nullptr;
  }
  const int chunks = (p.d.k_dim + kChunk - 1) / kChunk;
  const int per_split = (chunks + p.d.splits - 1) / p.d.splits;
  const int begin = rank * per_split, end = min(chunks, begin + per_split);

  // Before the wait: parameters only. This warp's first round into registers, the slab's next
  // two rounds into L2 (one bulk prefetch per weight row).
  Chunk c[kUnroll];
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int chunk = begin + warp + u * kWarps;
    const int k = chunk * kChunk + 8 * t4;
    const bool in = chunk < end && k < p.d.k_dim;
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt)
      c[u].w[nt] = in && w_rows[nt] != nullptr ? load_stream(w_rows[nt] + k) : zero;
  }
  if (threadIdx.x < kSlabCols<false> && col0 + int(threadIdx.x) < p.d.n) {
    const int k0 = (begin + kWarps * kUnroll) * kChunk;
    const int k1 = min(p.d.k_dim, min(end, begin + kWarps * kUnroll + kPrefetchChunks) * kChunk);
    if (k1 > k0)
      prefetch_l2(p.d.w + int64_t(col0 + threadIdx.x) * p.d.k_dim + k0, unsigned(k1 - k0) * sizeof(T));
  }
  pdl_wait();  // x and the residual come from the previous kernel; residual_out may still be read
  pdl_launch_dependents();

  block_inv_rms<T, W>(p, row0, rows, blockIdx.x == 0 && blockIdx.y == 0, warp_sums, inv);
  float acc[kTiles][4] = {};
  stream_normed<T, W>(acc, c, w_rows, p, row0, inv, begin, end);
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp * kFrag + (nt * 4 + i) * 32 + lane] = acc[nt][i];
  reduce_and_store<T, false>(p.d, partial, rank, row0, col0);
}

// Whether the fused kernel takes these inputs (else the composed ops): linear_small's fast
// path, a residual with the same row alignment, and a norm weight aligned for 8-element packs
// (so fused_add_rms_norm, given the same tensors, would sum in 16-byte packs too).
bool fuses(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight,
           const at::Tensor& weight, int64_t n) {
  return n > 0 && streams(x, weight) && (residual.stride(1) == 1 || residual.size(1) <= 1) &&
         residual.stride(0) % kPack == 0 && is_aligned16(residual.data_ptr()) &&
         reinterpret_cast<std::uintptr_t>(norm_weight.data_ptr()) % (kPack * norm_weight.element_size()) == 0;
}

template <typename T, typename W>
void launch_norm_gemv(at::Tensor& out, at::Tensor& residual_out, const at::Tensor& x, const at::Tensor& residual,
                      const at::Tensor& norm_weight, double epsilon, const at::Tensor& weight,
                      const at::Tensor& bias, const char* op) {
  const int m = static_cast<int>(x.size(0)), k_dim = static_cast<int>(x.size(1));
  const int n = static_cast<int>(out.size(1));
  const int64_t slabs = ceil_div(n, kSlabCols<false>), row_blocks = ceil_div(m, 16);
  SPLITVL_CHECK(slabs <= 65535 && row_blocks <= 65535, op, ": output too large for one launch, got ",
                out.sizes());
  const bool clusters = at::cuda::getCurrentDeviceProperties()->major >= 9;
  const int splits = choose_splits(slabs * row_blocks, ceil_div(k_dim, kChunk), clusters);
  // fused_add_rms_norm's threads per row (layernorm.cu launch_rows, 16-byte packs).
  const int nvec = k_dim / kPack;
  const bool norm_warp = nvec <= 128;
  const int norm_threads = norm_warp ? 32 : std::min(1024, ((nvec + 31) / 32) * 32);
  const NormGemvArgs<T, W> args{
      DenseArgs<T>{reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(x.data_ptr()),
                   reinterpret_cast<const T*>(weight.data_ptr()),
                   bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr, x.stride(0), m,
                   k_dim, n, splits},
      reinterpret_cast<const T*>(residual.data_ptr()),
      reinterpret_cast<T*>(residual_out.data_ptr()),
      reinterpret_cast<const W*>(norm_weight.data_ptr()),
      residual.stride(0),
      static_cast<float>(epsilon),
      norm_threads,
      norm_warp};
  const dim3 grid(splits, static_cast<unsigned>(slabs), static_cast<unsigned>(row_blocks));
  launch_pdl_cluster(static_cast<unsigned>(splits), add_norm_gemv_kernel<T, W>, grid, kWarps * 32, 0,
                     at::cuda::getCurrentCUDAStream(), args);
}

}  // namespace

void add_rms_norm_linear_small(at::Tensor& out, at::Tensor& residual_out, const at::Tensor& x,
                               const at::Tensor& residual, const at::Tensor& norm_weight, double epsilon,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "add_rms_norm_linear_small";
  check_cuda_tensors(op, "x", x, out, residual_out, residual, norm_weight, weight);
  check_add_rms_norm_linear_small(out, residual_out, x, residual, norm_weight, weight, bias, op);
  if (x.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  if (!fuses(x, residual, norm_weight, weight, out.size(1))) {
    residual_out.copy_(residual);
    at::Tensor normed = x.clone(at::MemoryFormat::Contiguous);
    splitvl::cuda::fused_add_rms_norm(normed, residual_out, norm_weight, epsilon);
    splitvl::cuda::linear_small(out, normed, weight, bias);
    return;
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (norm_weight.scalar_type() == at::kFloat)
        launch_norm_gemv<scalar_t, float>(out, residual_out, x, residual, norm_weight, epsilon, weight, b, op);
      else
        launch_norm_gemv<scalar_t, scalar_t>(out, residual_out, x, residual, norm_weight, epsilon, weight, b, op);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
