// moe_decode_block: a MoE layer's second half at decode in one launch (semantics:
// ops/reference_moe.py). At batch 1 the chain it replaces (add + norm, router linear, moe_route,
// moe_gate_up, moe_down, moe_combine) is six small launches whose latencies, not the expert
// weight reads, set the layer's time.
//
// One persistent grid of SMs x (CTAs per SM, from the occupancy calculator, at most
// kMaxCtasPerSm), all co-resident, in three phases split by two grid barriers:
//   0+1. Every CTA adds x to the residual and normalises the T rows into shared memory
//        (redundantly: 4 KB a token, the same bits in every CTA: the sums of squares reduce
//        in a fixed order); one warp per router row sums its logits for every token
//        (fp32, rounded to the dtype as the router linear's output is) into an fp32 workspace.
//        CTA 0 stages the new residual rows in `out` (other CTAs still read the old ones).
//   2.   Every CTA reads the E logits back and runs the top-k (topk_common.cuh) itself; CTA 0
//        writes the residual; then every warp of the grid takes (pair, intermediate row)
//        tasks: the gate row and the up row of the pair's expert against the token's normed
//        row, SiLU(g) * u rounded into the act workspace [T * k, I].
//   3.   Every CTA copies act into shared memory; each warp owns output elements (t, h): its
//        lanes split into one group per pick j (32 / k lanes rounded down to a power of two),
//        each group dots down[e_j][h, :] with act[t, j, :], and the k products times the router
//        weights, each rounded to the dtype as moe_down rounds, are summed in j order in fp32
//        (moe_combine's order) into out[t, h]. No atomics: each output has one owner.
//
// The grid barrier (grid_barrier) is cooperative groups' scheme on a persistent int32 the
// caller owns: CTA 0 adds 2^31 - (n - 1), the others 1, so the top bit flips once all n have
// arrived and the low bits are back to 0: no memset between launches, CUDA graphs replay it.
// A CTA publishes its writes with __syncthreads + threadfence before arriving and reads
// other CTAs' writes only after the flip, through L2 (__ldcg), never a stale L1 line.
//
// Launched with PDL (pdl.cuh): each router warp loads its row's first packs before pdl_wait
// (weights no kernel writes); x, the residual, the counter and every output are touched only
// after it. pdl_launch_dependents comes after the last grid barrier only: by then every CTA is
// resident, so a dependent kernel never takes an SM that a CTA still waiting to start needs.
//
// Steps of more than kMaxTokens tokens and shapes the kernel does not take (H or I not a
// multiple of a 16-byte pack, unaligned or strided rows, E > 512, shared memory beyond the
// device's) run the chain of ops (moe_decode_block.h), so the op is always correct.
#include <map>
#include <mutex>
#include <tuple>

#include "../moe_decode_block.h"
#include "common.cuh"
#include "gemv_stream.cuh"
#include "norm_common.cuh"
#include "ops.cuh"
#include "pdl.cuh"
#include "topk_common.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCtasPerSm = 2;  // more CTAs add barrier arrivals; 16 warps/SM keep HBM busy
constexpr int kMaxTokens = 8;  // ops/reference_moe.py MOE_DECODE_BLOCK_MAX_TOKENS
constexpr int kMaxExperts = 512;  // the top-k's 16 values a lane (VPT 32 spills)
constexpr int kRouterCache = 8;  // router packs per lane read before the wait (a 2,048-wide bf16 row)
constexpr int kUpChunk = 8;  // packs per lane of a gate row and of its up row in flight
constexpr int kDownChunk = 8;  // packs per lane of a down row in flight
constexpr int kAddBatch = 4;  // x and residual packs per thread in flight in phase 0

template <typename T, typename W>
struct BlockArgs {
  const T* x;  // [T, H], rows x_stride apart
  T* residual;  // [T, H], rows res_stride apart
  T* out;  // [T, H] contiguous; CTA 0 stages the new residual here during phases 0-2
  const W* norm_weight;  // [H]
  const T* gate;  // [E, H]
  const T* gate_up;  // [E, 2I, H]
  const T* down;  // [E, H, I]
  float* logits;  // [T, E] workspace
  T* act;  // [T * k, I] workspace
  unsigned* barrier;  // persistent grid-barrier counter
  int64_t x_stride, res_stride;
  float eps;
  int tokens, hidden, experts, inter, k;
  int group;  // lanes per pick in phase 3: 32 / (k rounded up to a power of two)
  int rows_bytes;  // shared bytes of the normed rows / act region
  bool renormalize;
};

// Value e of a 16-byte pack of T, widened.
template <typename T>
__device__ __forceinline__ float pack_value(const uint4& v, int e) {
  constexpr int V = kPack16<T>;
  Words<T, V> w;
  memcpy(&w, &v, sizeof(w));
  return word_value<T, V>(w, e);
}

template <typename T>
__device__ __forceinline__ float dot_pack(const uint4& a, const uint4& b) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kPack16<T>; ++e) s = fmaf(pack_value<T>(a, e), pack_value<T>(b, e), s);
  return s;
}

template <typename T>
__device__ __forceinline__ uint4 to_uint4(const Pack<T, kPack16<T>>& p) {
  uint4 v;
  memcpy(&v, &p, sizeof(v));
  return v;
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Every CTA of the grid waits here until all have arrived; writes before it are visible to
// every CTA after it (read them with __ldcg). The counter's low 31 bits are 0 between barriers.
__device__ __forceinline__ void grid_barrier(unsigned* counter) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    __threadfence();  // this CTA's writes (ordered before by __syncthreads) first
    const unsigned old = atomicAdd(counter, add);
    while (((old ^ load_acquire(counter)) & 0x80000000u) == 0) {
    }
    __threadfence();
  }
  __syncthreads();
}

// Phase 0: residual = x + residual (rounded), rows = rms_norm(residual) for every token. The
// CTA's threads split the T * H / V packs (one each at T = 1, H = 2,048, bf16), kAddBatch loads
// in flight per thread; the sums of squares reduce in a fixed order (red, inv: shared), so
// every CTA normalises to the same bits. CTA 0 also stages the new residual rows in out.
template <typename T, typename W>
__device__ void add_norm(const BlockArgs<T, W>& a, T* rows, float* red, float* inv) {
  constexpr int V = kPack16<T>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int packs = a.hidden / V, total = a.tokens * packs;
  uint4* row = reinterpret_cast<uint4*>(rows);  // [T, packs]
  uint4* stage = reinterpret_cast<uint4*>(a.out);  // contiguous [T, packs]
  float ss[kMaxTokens] = {};
  for (int first = threadIdx.x; first < total; first += kAddBatch * kThreads) {
    uint4 xv[kAddBatch], rv[kAddBatch];
#pragma unroll
    for (int b = 0; b < kAddBatch; ++b) {
      const int idx = first + b * kThreads, t = idx / packs, i = idx % packs;
      if (idx < total) {
        xv[b] = __ldcg(reinterpret_cast<const uint4*>(a.x + t * a.x_stride) + i);
        rv[b] = __ldcg(reinterpret_cast<const uint4*>(a.residual + t * a.res_stride) + i);
      }
    }
#pragma unroll
    for (int b = 0; b < kAddBatch; ++b) {
      const int idx = first + b * kThreads, t = idx / packs;
      if (idx < total) {
        Pack<T, V> sum;
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          sum.v[e] = from_float<T>(pack_value<T>(xv[b], e) + pack_value<T>(rv[b], e));
          const float f = to_float(sum.v[e]);
          s += f * f;
        }
#pragma unroll
        for (int tt = 0; tt < kMaxTokens; ++tt)
          if (tt == t) ss[tt] += s;
        row[idx] = to_uint4<T>(sum);
        if (blockIdx.x == 0) stage[idx] = row[idx];
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    if (t < a.tokens) {
      const float s = warp_sum(ss[t]);
      if (lane == 0) red[warp * kMaxTokens + t] = s;
    }
  }
  __syncthreads();
  if (threadIdx.x < a.tokens) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red[w * kMaxTokens + threadIdx.x];
    inv[threadIdx.x] = rsqrtf(s / a.hidden + a.eps);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int i = idx % packs;
    const float scale = inv[idx / packs];
    const uint4 r = row[idx];  // this thread's own write
    Pack<T, V> normed;
#pragma unroll
    for (int e = 0; e < V; ++e)
      normed.v[e] = scale_weight<T, W>(pack_value<T>(r, e), scale, a.norm_weight[i * V + e]);
    row[idx] = to_uint4<T>(normed);
  }
}

// acc[t] += dot(weight pack i, normed row t's pack i) for every token.
template <typename T, typename W>
__device__ __forceinline__ void dot_tokens(const BlockArgs<T, W>& a, const uint4* rows, int packs,
                                           const uint4& w, int i, float (&acc)[kMaxTokens]) {
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t)
    if (t < a.tokens) acc[t] += dot_pack<T>(w, rows[t * packs + i]);
}

// Phase 1: router rows e = gw, gw + nwarps, ... (one warp each) for every token into logits;
// `cache` holds row gw's first packs (read before the PDL wait).
template <typename T, typename W>
__device__ void router_logits(const BlockArgs<T, W>& a, const T* rows_t,
                              const uint4 (&cache)[kRouterCache], int gw, int nwarps) {
  constexpr int V = kPack16<T>;
  const int lane = threadIdx.x & 31, packs = a.hidden / V;
  const uint4* rows = reinterpret_cast<const uint4*>(rows_t);
  for (int e = gw; e < a.experts; e += nwarps) {
    const uint4* w = reinterpret_cast<const uint4*>(a.gate + int64_t(e) * a.hidden);
    float acc[kMaxTokens] = {};
#pragma unroll
    for (int c = 0; c < kRouterCache; ++c) {
      const int i = lane + 32 * c;
      if (i < packs) dot_tokens(a, rows, packs, e == gw ? cache[c] : gemv::load_stream(w + i), i, acc);
    }
    for (int i = lane + 32 * kRouterCache; i < packs; i += 32)
      dot_tokens(a, rows, packs, gemv::load_stream(w + i), i, acc);
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < a.tokens) {
        const float logit = warp_sum(acc[t]);
        if (lane == 0) a.logits[t * a.experts + e] = to_float(from_float<T>(logit));
      }
    }
  }
}

// CTA 0, phase 2: the staged residual rows (out) into residual. Same thread-to-pack map as
// add_norm's first pass, so each thread reads back its own writes.
template <typename T, typename W>
__device__ void publish_residual(const BlockArgs<T, W>& a) {
  const int packs = a.hidden / kPack16<T>, total = a.tokens * packs;
  const uint4* stage = reinterpret_cast<const uint4*>(a.out);
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int t = idx / packs, i = idx % packs;
    reinterpret_cast<uint4*>(a.residual + t * a.res_stride)[i] = __ldcg(stage + idx);
  }
}

// Phase 2: act[p, i] = silu(gate row i . x_t) * (up row i . x_t) for pair p = t * k + j of
// expert pick_id[p]; tasks (p, i) spread over every warp of the grid.
template <typename T, typename W>
__device__ void gate_up(const BlockArgs<T, W>& a, const T* rows_t, const int* pick_id, int gw,
                        int nwarps) {
  constexpr int V = kPack16<T>;
  const int lane = threadIdx.x & 31, packs = a.hidden / V;
  const int64_t tasks = int64_t(a.tokens) * a.k * a.inter;
  for (int64_t task = gw; task < tasks; task += nwarps) {
    const int p = static_cast<int>(task / a.inter), i = static_cast<int>(task % a.inter);
    const int e = pick_id[p];
    float h = 0.f;
    if (e >= 0 && e < a.experts) {  // always, but for NaN logits (a dropped pair)
      const uint4* g = reinterpret_cast<const uint4*>(a.gate_up + (int64_t(e) * 2 * a.inter + i) * a.hidden);
      const uint4* u = g + int64_t(a.inter) * packs;
      const uint4* x = reinterpret_cast<const uint4*>(rows_t) + (p / a.k) * packs;
      float sg = 0.f, su = 0.f;
      for (int base = lane; base < packs; base += 32 * kUpChunk) {
        uint4 wg[kUpChunk], wu[kUpChunk];
#pragma unroll
        for (int c = 0; c < kUpChunk; ++c) {
          const int idx = base + 32 * c;
          if (idx < packs) {
            wg[c] = gemv::load_stream(g + idx);
            wu[c] = gemv::load_stream(u + idx);
          }
        }
#pragma unroll
        for (int c = 0; c < kUpChunk; ++c) {
          const int idx = base + 32 * c;
          if (idx < packs) {
            const uint4 xv = x[idx];
            sg += dot_pack<T>(wg[c], xv);
            su += dot_pack<T>(wu[c], xv);
          }
        }
      }
      sg = warp_sum(sg);
      su = warp_sum(su);
      h = sg / (1.f + __expf(-sg)) * su;
    }
    if (lane == 0) a.act[int64_t(p) * a.inter + i] = from_float<T>(h);
  }
}

// Phase 3: out[t, h] = sum over j of round(dot(down[e_j][h, :], act[t, j, :]) * w[t, j]),
// fp32 in j order; act_t is the act rows in shared memory.
template <typename T, typename W>
__device__ void down_combine(const BlockArgs<T, W>& a, const T* act_t, const float* pick_w,
                             const int* pick_id, int gw, int nwarps) {
  constexpr int V = kPack16<T>;
  const int lane = threadIdx.x & 31, packs = a.inter / V;
  const int group = a.group, j = lane / group, sub = lane % group;
  const uint4* act = reinterpret_cast<const uint4*>(act_t);
  const int64_t tasks = int64_t(a.tokens) * a.hidden;
  for (int64_t task = gw; task < tasks; task += nwarps) {
    const int t = static_cast<int>(task / a.hidden), col = static_cast<int>(task % a.hidden);
    const int p = t * a.k + j;
    const int e = j < a.k ? pick_id[p] : -1;
    const bool routed = e >= 0 && e < a.experts;
    float s = 0.f;
    if (routed) {
      const uint4* w = reinterpret_cast<const uint4*>(a.down + (int64_t(e) * a.hidden + col) * a.inter);
      const uint4* hv = act + int64_t(p) * packs;
      for (int base = sub; base < packs; base += group * kDownChunk) {
        uint4 wc[kDownChunk];
#pragma unroll
        for (int c = 0; c < kDownChunk; ++c) {
          const int idx = base + group * c;
          if (idx < packs) wc[c] = gemv::load_stream(w + idx);
        }
#pragma unroll
        for (int c = 0; c < kDownChunk; ++c) {
          const int idx = base + group * c;
          if (idx < packs) s += dot_pack<T>(wc[c], hv[idx]);
        }
      }
    }
    for (int o = group / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float y = routed ? to_float(from_float<T>(s * pick_w[p])) : 0.f;
    float sum = 0.f;
    for (int jj = 0; jj < a.k; ++jj) sum += __shfl_sync(0xffffffffu, y, jj * group);
    if (lane == 0) a.out[int64_t(t) * a.hidden + col] = from_float<T>(sum);
  }
}

template <typename T, typename W, int VPT>
__global__ void __launch_bounds__(kThreads, kMaxCtasPerSm) moe_decode_block_kernel(BlockArgs<T, W> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* rows = reinterpret_cast<T*>(smem);  // normed [T, H] in phases 0-2, act [T * k, I] in 3
  float* logits = reinterpret_cast<float*>(smem + a.rows_bytes);  // [T, E]
  float* pick_w = logits + a.tokens * a.experts;  // [T, k]
  int* pick_id = reinterpret_cast<int*>(pick_w + a.tokens * a.k);  // [T, k]
  float* red = reinterpret_cast<float*>(pick_id + a.tokens * a.k);  // [kWarps, kMaxTokens]
  float* inv = red + kWarps * kMaxTokens;  // [kMaxTokens]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gw = blockIdx.x * kWarps + warp, nwarps = gridDim.x * kWarps;
  constexpr int V = kPack16<T>;

  uint4 cache[kRouterCache] = {};
  if (gw < a.experts) {
    const uint4* w = reinterpret_cast<const uint4*>(a.gate + int64_t(gw) * a.hidden);
#pragma unroll
    for (int c = 0; c < kRouterCache; ++c)
      if (lane + 32 * c < a.hidden / V) cache[c] = gemv::load_stream(w + lane + 32 * c);
  }
  pdl_wait();  // x and the residual come from the previous kernels (pdl.cuh)

  add_norm(a, rows, red, inv);
  __syncthreads();
  router_logits(a, rows, cache, gw, nwarps);
  grid_barrier(a.barrier);

  if (blockIdx.x == 0) publish_residual(a);  // every CTA has read the old residual
  for (int i = threadIdx.x; i < a.tokens * a.experts; i += kThreads) logits[i] = __ldcg(a.logits + i);
  __syncthreads();
  for (int t = warp; t < a.tokens; t += kWarps) {
    const TopkPick pick = topk_row<float, VPT>(logits + t * a.experts, a.experts, a.k, a.renormalize);
    if (lane < a.k) {
      pick_w[t * a.k + lane] = pick.weight;
      pick_id[t * a.k + lane] = pick.id;
    }
  }
  __syncthreads();
  gate_up(a, rows, pick_id, gw, nwarps);
  grid_barrier(a.barrier);
  pdl_launch_dependents();  // every CTA is resident: one just passed the barrier

  const int act_packs = a.tokens * a.k * a.inter / V;
  const uint4* act = reinterpret_cast<const uint4*>(a.act);
  for (int i = threadIdx.x; i < act_packs; i += kThreads) reinterpret_cast<uint4*>(rows)[i] = __ldcg(act + i);
  __syncthreads();
  down_combine(a, rows, pick_w, pick_id, gw, nwarps);
}

// CTAs of `kernel` one SM holds at `smem` dynamic bytes (0 if none), queried once per
// (kernel, smem, device); the kernel's shared-memory cap is raised to the device's opt-in
// maximum on its first query.
int ctas_per_sm(const void* kernel, size_t smem, int device, int smem_optin) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, size_t, int>, int> cache;
  static std::map<std::pair<const void*, int>, bool> raised;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, smem, device);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (!raised[{kernel, device}]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
    raised[{kernel, device}] = true;
  }
  int ctas = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, smem));
  cache.emplace(key, ctas);
  return ctas;
}

struct CudaChain {
  static constexpr auto fused_add_rms_norm = &cuda::fused_add_rms_norm;
  static constexpr auto moe_route = &cuda::moe_route;
  static constexpr auto moe_gate_up = &cuda::moe_gate_up;
  static constexpr auto moe_down = &cuda::moe_down;
  static constexpr auto moe_combine = &cuda::moe_combine;
};

int64_t round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Launches the kernel; false (nothing launched) where it cannot take the call.
template <typename T, typename W>
bool launch_block(at::Tensor& out, at::Tensor& residual, at::Tensor& barrier, const at::Tensor& x,
                  const at::Tensor& norm_weight, double epsilon, const at::Tensor& gate_weight,
                  const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                  const MoeDecodeDims& d, bool renormalize) {
  constexpr int V = kPack16<T>;
  if (d.tokens < 1 || d.tokens > kMaxTokens || d.experts > kMaxExperts) return false;
  if (d.hidden % V != 0 || d.inter % V != 0 || x.stride(0) % V != 0 || residual.stride(0) % V != 0)
    return false;
  if (!gate_weight.is_contiguous() || !gate_up_proj.is_contiguous() || !down_proj.is_contiguous() ||
      !norm_weight.is_contiguous())
    return false;
  for (const void* p : {out.data_ptr(), residual.data_ptr(), x.data_ptr(), gate_weight.data_ptr(),
                        gate_up_proj.data_ptr(), down_proj.data_ptr()})
    if (!is_aligned16(p)) return false;
  const int64_t rows_bytes = round16(std::max(d.tokens * d.hidden, d.tokens * d.k * d.inter) * int64_t(sizeof(T)));
  const int64_t smem = rows_bytes + 4 * d.tokens * d.experts + 8 * d.tokens * d.k + 4 * (kWarps + 1) * kMaxTokens;
  const int device = x.get_device();
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  if (smem > int64_t(prop->sharedMemPerBlockOptin)) return false;
  int k_pow2 = 1;
  while (k_pow2 < d.k) k_pow2 *= 2;

  const int64_t logits_bytes = round16(4 * d.tokens * d.experts);
  at::Tensor workspace = at::empty({logits_bytes + d.tokens * d.k * d.inter * int64_t(sizeof(T))},
                                   x.options().dtype(at::kByte));
  auto* base = static_cast<unsigned char*>(workspace.data_ptr());
  const BlockArgs<T, W> a{
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<T*>(residual.data_ptr()),
      reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const W*>(norm_weight.data_ptr()),
      reinterpret_cast<const T*>(gate_weight.data_ptr()),
      reinterpret_cast<const T*>(gate_up_proj.data_ptr()),
      reinterpret_cast<const T*>(down_proj.data_ptr()), reinterpret_cast<float*>(base),
      reinterpret_cast<T*>(base + logits_bytes), reinterpret_cast<unsigned*>(barrier.data_ptr()),
      x.stride(0), residual.stride(0), static_cast<float>(epsilon), static_cast<int>(d.tokens),
      static_cast<int>(d.hidden), static_cast<int>(d.experts), static_cast<int>(d.inter),
      static_cast<int>(d.k), 32 / k_pow2, static_cast<int>(rows_bytes), renormalize};
  auto kernel = d.experts <= 128 ? moe_decode_block_kernel<T, W, 4> : moe_decode_block_kernel<T, W, 16>;
  const int per_sm = std::min(kMaxCtasPerSm, ctas_per_sm(reinterpret_cast<const void*>(kernel), size_t(smem),
                                                         device, int(prop->sharedMemPerBlockOptin)));
  if (per_sm < 1) return false;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_pdl(kernel, dim3(per_sm * prop->multiProcessorCount), dim3(kThreads), size_t(smem), stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

void moe_decode_block(at::Tensor& out, at::Tensor& residual, at::Tensor& barrier,
                      const at::Tensor& x, const at::Tensor& norm_weight, double epsilon,
                      const at::Tensor& gate_weight, const at::Tensor& gate_up_proj,
                      const at::Tensor& down_proj, int64_t top_k, bool renormalize) {
  constexpr const char* op = "moe_decode_block";
  check_cuda(x, op, "x");
  const MoeDecodeDims d = check_moe_decode_block(out, residual, barrier, x, norm_weight,
                                                 gate_weight, gate_up_proj, down_proj, top_k);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool fp32_weight = norm_weight.scalar_type() == at::kFloat;
  const bool launched = SPLITVL_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    using T = scalar_t;
    if (fp32_weight)
      return launch_block<T, float>(out, residual, barrier, x, norm_weight, epsilon, gate_weight,
                                    gate_up_proj, down_proj, d, renormalize);
    return launch_block<T, T>(out, residual, barrier, x, norm_weight, epsilon, gate_weight,
                              gate_up_proj, down_proj, d, renormalize);
  });
  if (!launched)
    moe_decode_block_chain<CudaChain>(out, residual, x, norm_weight, epsilon, gate_weight,
                                      gate_up_proj, down_proj, d, renormalize);
}

}  // namespace splitvl::cuda
