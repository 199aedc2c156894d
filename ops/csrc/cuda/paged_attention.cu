// paged_attention_decode: one query token per sequence over its paged KV cache.
//
// Flash-decoding in one pass: grid (kv head x query-head group, sequence, context
// split). A CTA serves the GT query heads that share one KV head (GQA), so each
// K/V row is read once for all of them. The CTA first stages the cache rows of
// its partition and the pre-scaled q in shared memory. Then L lanes share one
// token row: each lane holds CPL 16-byte chunks of the row and, in registers, q
// of the GT heads for those dims. A row group loads the K and V rows of U tokens
// before using any, reduces the dot products with shuffles and folds them into
// its own online softmax (base 2) and output accumulators. Row groups then merge
// through shuffles, warps through shared memory. Long contexts are cut into
// partitions whose partial results (max, sum, normalised output) are merged, by the
// last CTA of each (sequence, head group) or by a second kernel
// (paged_decode_merge.cuh). The number of partitions comes from the block table
// width, so the host never reads seq_lens.
#include <climits>
#include <mutex>
#include <vector>

#include "../decode_merge.h"
#include "ops.cuh"
#include "pdl.cuh"
#include "paged_decode_common.cuh"
#include "paged_decode_merge.cuh"
#include "paged_decode_mma.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kWarps = kDecodeWarps;
constexpr int kThreads = kDecodeThreads;
constexpr int kMaxHeadDim = 256;
constexpr int kMinPartition = 32;

// Lanes per token row and 16-byte chunks per lane (a power of two) for GT heads and
// `chunks` chunks per row: the fewest lanes (8, 16 or 32, no more than the row has
// chunks) that keep q and the accumulators of a lane within 32 floats each.
struct RowTiling {
  int lanes, cpl;
};

constexpr RowTiling pick_tiling(int gt, int chunks, int vec) {
  for (int lanes = 8;; lanes *= 2) {
    int cpl = 1;
    while (cpl * lanes < chunks) cpl *= 2;
    if (lanes == 32 || lanes >= chunks || gt * cpl * vec <= 32) return {lanes, cpl};
  }
}

// Whether some head dim up to kMaxHeadDim picks (L, CPL): only those are instantiated.
constexpr bool tiling_used(int gt, int vec, int lanes, int cpl) {
  for (int chunks = 1; chunks <= kMaxHeadDim / vec; ++chunks) {
    const RowTiling t = pick_tiling(gt, chunks, vec);
    if (t.lanes == lanes && t.cpl == cpl) return true;
  }
  return false;
}

// Tokens a row group loads per step: 8 (GT 8: 4) 16-byte loads in flight per lane,
// or one token when its chunks alone are more.
constexpr int tokens_per_step(int gt, int cpl) {
  const int u = (gt >= 8 ? 2 : 4) / cpl;
  return u > 1 ? u : 1;
}

// A 16-byte chunk of T, loaded as four raw words, widened to floats.
template <typename T>
__device__ __forceinline__ void widen(const uint4& w, float (&f)[kPack16<T>]);

template <>
__device__ __forceinline__ void widen<float>(const uint4& w, float (&f)[4]) {
  f[0] = __uint_as_float(w.x);
  f[1] = __uint_as_float(w.y);
  f[2] = __uint_as_float(w.z);
  f[3] = __uint_as_float(w.w);
}

template <>
__device__ __forceinline__ void widen<__nv_bfloat16>(const uint4& w, float (&f)[8]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(words[i] << 16);
    f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void widen<__half>(const uint4& w, float (&f)[8]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

template <typename T, int GT, int L, int CPL>
__global__ void __launch_bounds__(kThreads, GT >= 8 ? 2 : 4) paged_decode_kernel(DecodeParams<T> p) {
  constexpr int VEC = kPack16<T>;
  constexpr int R = 32 / L;      // row groups per warp
  constexpr int N = kWarps * R;  // rows per CTA
  constexpr int U = tokens_per_step(GT, CPL);
  extern __shared__ float smem[];
  const int D = p.head_dim, chunks = D / VEC;
  int* rows = reinterpret_cast<int*>(smem);  // [kMaxPartition]: cache row (slot * Hkv) per token
  float* q_s = smem + kMaxPartition;         // [GT, D], pre-scaled
  float* red_acc = q_s + GT * D;             // [kWarps, GT, D]
  float* red_m = red_acc + kWarps * GT * D;  // [kWarps, GT]
  float* red_w = red_m + kWarps * GT;        // [kWarps, GT]: sums, then merge weights
  pdl_wait();  // q, the cache, block tables and lengths come from earlier kernels (pdl.cuh)
  pdl_launch_dependents();

  const DecodeCta cta = decode_cta(p, GT);
  const int kv_head = cta.kv_head, b = cta.b, split = cta.split, h0 = cta.h0, heads = cta.heads;
  const int start = cta.start;
  const int seq_len = max(p.seq_lens[b], 0);
  // Stage q and the rows of the whole partition (within the table) without waiting
  // for seq_len; the loads are unconditional (clamped) so that all are in flight at once.
  constexpr int QN = kMaxHeadDim / kThreads;
  float qx[GT][QN];
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int r = 0; r < QN; ++r) {
      const int d = min(threadIdx.x + r * kThreads, D - 1);
      qx[g][r] = to_float(p.q[b * p.q_s0 + (h0 + min(g, heads - 1)) * p.q_s1 + d]);
    }
  int phys[kRowsPerThread];
  load_phys(p, b, start, phys);
  const float qscale = p.scale * kLog2e;
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int r = 0; r < QN; ++r) {
      const int d = threadIdx.x + r * kThreads;
      if (d < D) q_s[g * D + d] = g < heads ? qx[g][r] * qscale : 0.f;
    }
  store_rows(p, start, phys, rows);
  __syncthreads();
  if (start >= seq_len && split > 0) return;  // unused partition: the merges skip it
  const int n = min(seq_len - start, p.part);
  const int used = used_partitions(p, seq_len);
  const bool direct = p.splits == 1 || (p.merge_tickets != nullptr && used <= 1);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gl = lane % L, row = warp * R + lane / L;
  float q[GT][CPL][VEC];
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int c = gl + k * L;
#pragma unroll
      for (int j = 0; j < VEC; ++j) q[g][k][j] = c < chunks ? q_s[g * D + c * VEC + j] : 0.f;
    }
  const T* kbase = p.key_cache + int64_t(kv_head) * D;
  const T* vbase = p.value_cache + int64_t(kv_head) * D;
  float m[GT], l[GT], acc[GT][CPL][VEC];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int k = 0; k < CPL; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[g][k][j] = 0.f;
  }
  // The loop bound is block-uniform: the shuffles need every lane of the warp.
  for (int base = 0; base < n; base += N * U) {
    uint4 kr[U][CPL], vr[U][CPL];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * N + row;
      valid[u] = i < n;
      const int64_t off = int64_t(rows[valid[u] ? i : 0]) * D;
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int c = gl + k * L;
        // Zeros when masked: a masked value must not turn 0 * garbage into NaN.
        kr[u][k] = vr[u][k] = make_uint4(0u, 0u, 0u, 0u);
        if (valid[u] && c < chunks) {
          kr[u][k] = *reinterpret_cast<const uint4*>(kbase + off + c * VEC);
          vr[u][k] = *reinterpret_cast<const uint4*>(vbase + off + c * VEC);
        }
      }
    }
    float s[U][GT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[CPL][VEC];
#pragma unroll
      for (int k = 0; k < CPL; ++k) widen<T>(kr[u][k], kf[k]);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float d = 0.f;
#pragma unroll
        for (int k = 0; k < CPL; ++k)
#pragma unroll
          for (int j = 0; j < VEC; ++j) d = fmaf(q[g][k][j], kf[k][j], d);
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[u][g] = valid[u] ? d : -INFINITY;
      }
    }
    float alpha[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][g]);
      const float ms = mx == -INFINITY ? 0.f : mx;
      alpha[g] = exp2f(m[g] - ms);
      m[g] = mx;
      l[g] *= alpha[g];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][g] = exp2f(s[u][g] - ms);  // now the probability (0 when masked)
        l[g] += s[u][g];
      }
#pragma unroll
      for (int k = 0; k < CPL; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[g][k][j] *= alpha[g];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[CPL][VEC];
#pragma unroll
      for (int k = 0; k < CPL; ++k) widen<T>(vr[u][k], vf[k]);
#pragma unroll
      for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int k = 0; k < CPL; ++k)
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[g][k][j] = fmaf(s[u][g], vf[k][j], acc[g][k][j]);
    }
  }
  // Merge the row groups of the warp into the first one.
#pragma unroll
  for (int o = L; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
      const float mx = fmaxf(m[g], mo), ms = mx == -INFINITY ? 0.f : mx;
      const float a = exp2f(m[g] - ms), e = exp2f(mo - ms);
      m[g] = mx;
      l[g] = l[g] * a + lo * e;
#pragma unroll
      for (int k = 0; k < CPL; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          acc[g][k][j] = acc[g][k][j] * a + __shfl_xor_sync(0xffffffffu, acc[g][k][j], o) * e;
    }
  if (lane < L) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int c = gl + k * L;
        if (c < chunks) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) red_acc[(warp * GT + g) * D + c * VEC + j] = acc[g][k][j];
        }
      }
      if (gl == 0) {
        red_m[warp * GT + g] = m[g];
        red_w[warp * GT + g] = l[g];
      }
    }
  }
  __syncthreads();
  finish_partition<T, GT>(p, red_acc, red_m, red_w, b, h0, heads, split, direct);
  if (!direct && p.merge_tickets != nullptr) merge_if_last<GT>(p, b, h0, heads, split, used);
}

void check_decode_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& block_tables,
                       const at::Tensor& seq_lens) {
  constexpr const char* op = "paged_attention_decode";
  check_cuda(query, op, "query");
  for (const at::Tensor& t : {out, key_cache, value_cache, block_tables, seq_lens})
    check_same_device(query, t, op);
  SPLITVL_CHECK(query.dim() == 3 && query.stride(2) == 1, op,
              ": query must be [B, Hq, D] with unit last stride, got ", query.sizes());
  SPLITVL_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() &&
                  key_cache.is_contiguous() && value_cache.is_contiguous(),
              op, ": caches must be contiguous [num_blocks, block_size, Hkv, D] of equal shape");
  SPLITVL_CHECK(key_cache.size(0) * key_cache.size(1) * key_cache.size(2) <= INT_MAX, op,
              ": the cache's rows (slots x kv heads) must fit int32");
  SPLITVL_CHECK(key_cache.size(3) == query.size(2), op, ": cache head_dim ", key_cache.size(3),
              " != query head_dim ", query.size(2));
  SPLITVL_CHECK(query.size(1) % key_cache.size(2) == 0, op, ": query heads ", query.size(1),
              " not a multiple of kv heads ", key_cache.size(2));
  SPLITVL_CHECK(query.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              op, ": query, caches and out must share one dtype");
  SPLITVL_CHECK(out.is_contiguous() && out.sizes() == query.sizes(), op,
              ": out must be contiguous with the query's shape");
  SPLITVL_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt &&
                  block_tables.size(0) == query.size(0),
              op, ": block_tables must be int32 [B, max_blocks]");
  SPLITVL_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.size(0) == query.size(0) && seq_lens.is_contiguous(),
              op, ": seq_lens must be contiguous int32 [B]");
  const int64_t D = query.size(2);
  const int64_t vec = 16 / query.element_size();
  SPLITVL_CHECK(D > 0 && D <= kMaxHeadDim && D % vec == 0, op, ": head_dim ", D,
              " must be a multiple of ", vec, " and at most ", kMaxHeadDim);
}

// Partition length from the table width (never seq_lens: CUDA graphs): the fewest
// partitions of at most kMaxPartition tokens that give the grid kCtasPerSm CTAs per SM,
// so that short contexts at large batch still keep many loads in flight on every SM;
// then the length is balanced over the partitions (a multiple of 16 tokens, at least
// kMinPartition) so that the last one is not nearly empty.
constexpr int kCtasPerSm = 4;

int pick_partition(int64_t ctas, int64_t max_ctx) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t fill = (kCtasPerSm * sms + ctas - 1) / ctas;
  const int64_t splits =
      std::max<int64_t>(ceil_div(max_ctx, kMaxPartition), std::min<int64_t>(fill, max_ctx));
  const int64_t part = (ceil_div(max_ctx, splits) + 15) / 16 * 16;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(part, kMinPartition), kMaxPartition));
}

// Tensor cores for groups of 4 or more in 16-bit types at head dim 128 or 256, with
// 16-byte aligned query rows (the q fragments are loaded as 16-byte chunks).
bool use_mma(const at::Tensor& query, int group) {
  const int64_t D = query.size(2);
  return group >= 4 && query.element_size() == 2 && (D == 128 || D == 256) &&
         reinterpret_cast<uintptr_t>(query.data_ptr()) % 16 == 0 && query.stride(0) % 8 == 0 &&
         query.stride(1) % 8 == 0;
}

// Partitions per first-level chunk of the fused merge: all of them up to 32 (one merge, two rounds
// of 16 partitions' loads per thread); beyond, about sqrt(splits) and at least 16, so that the two
// merges at the end of the grid (a chunk's, then the chunks') each read about sqrt(splits)
// partitions, not one CTA all of them (batch 1 at 4,096 tokens: 128 partitions, 8 chunks of 16).
int pick_merge_chunk(int splits) {
  if (splits <= 32) return splits;
  int chunk = 16;
  while (chunk * chunk < splits) ++chunk;
  return chunk;
}

// The fused merge's ticket counters on the current device: at least `count` int32, zero between
// launches (each launch zeroes what it drew, paged_decode_merge.cuh), so no memset per call or
// graph replay. One buffer per device, grown (zeroed, in stream order) only outside stream
// capture; null while `stream` captures a graph and the buffer is smaller: that call launches the
// merge kernel instead (the engine and the benches run each shape eagerly before capturing it).
// A grown-out buffer is kept, never freed: graphs captured before still use it. The counters
// assume that two calls of this op never run at once on different streams of one process (the
// engine runs each replica's steps on one stream; a graph replays in stream order with eager
// calls): concurrent calls would share counters. Keyed by device only, not by stream, because
// torch.cuda.graph captures on its own stream after the warm-up ran on the current one.
int* merge_tickets(int64_t count, cudaStream_t stream) {
  static std::mutex mutex;
  static auto* current = new std::vector<at::Tensor>();  // per device; leaked: no CUDA work at exit
  static auto* retired = new std::vector<at::Tensor>();
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(current->size()) <= device) current->resize(device + 1);
  at::Tensor& buffer = (*current)[device];
  if (buffer.defined() && buffer.numel() >= count) return buffer.data_ptr<int>();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return nullptr;
  int64_t size = 4096;
  while (size < count) size *= 2;
  if (buffer.defined()) retired->push_back(buffer);
  buffer = at::zeros({size}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
  return buffer.data_ptr<int>();
}

}  // namespace

void paged_attention_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale) {
  constexpr const char* op = "paged_attention_decode";
  check_decode_args(out, query, key_cache, value_cache, block_tables, seq_lens);
  const int64_t B = query.size(0), Hq = query.size(1), Hkv = key_cache.size(2);
  const int64_t D = query.size(2), block_size = key_cache.size(1);
  const int64_t max_ctx = block_tables.size(1) * block_size;
  if (B == 0 || Hq == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  if (max_ctx == 0) {  // no cached tokens at all
    out.zero_();
    return;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int group = static_cast<int>(Hq / Hkv);
  const bool mma = use_mma(query, group);
  const int gt = mma ? kMmaHeads : group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
  const int64_t groups_per_kv = (group + gt - 1) / gt;
  const int part = pick_partition(Hkv * groups_per_kv * B, max_ctx);
  const int splits = ceil_div(max_ctx, part);
  at::Tensor part_out, part_max, part_sum;
  const int merge_chunk = pick_merge_chunk(splits), merge_chunks = ceil_div(splits, merge_chunk);
  int* tickets = nullptr;  // null: the merge kernel merges the partitions
  if (splits > 1) {
    const auto f32 = query.options().dtype(at::kFloat);
    part_out = at::empty({B, Hq, splits, D}, f32);
    part_max = at::empty({B, Hq, splits}, f32);
    part_sum = at::empty({B, Hq, splits}, f32);
    // A counter per chunk and one over the chunks, per (sequence, CTA column of the grid).
    if (decode_fused_merge_enabled())
      tickets = merge_tickets(B * Hkv * groups_per_kv * (1 + merge_chunks), stream);
  }
  SPLITVL_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    constexpr int vec = kPack16<scalar_t>;
    DecodeParams<scalar_t> p{};
    p.q = reinterpret_cast<const scalar_t*>(query.data_ptr());
    p.q_s0 = query.stride(0);
    p.q_s1 = query.stride(1);
    p.key_cache = reinterpret_cast<const scalar_t*>(key_cache.data_ptr());
    p.value_cache = reinterpret_cast<const scalar_t*>(value_cache.data_ptr());
    p.block_tables = block_tables.data_ptr<int>();
    p.bt_s0 = block_tables.stride(0);
    p.bt_s1 = block_tables.stride(1);
    p.max_blocks = static_cast<int>(block_tables.size(1));
    p.seq_lens = seq_lens.data_ptr<int>();
    p.out = reinterpret_cast<scalar_t*>(out.data_ptr());
    p.part_out = splits > 1 ? part_out.data_ptr<float>() : nullptr;
    p.part_max = splits > 1 ? part_max.data_ptr<float>() : nullptr;
    p.part_sum = splits > 1 ? part_sum.data_ptr<float>() : nullptr;
    p.merge_tickets = tickets;
    p.merge_chunk = merge_chunk;
    p.merge_chunks = merge_chunks;
    p.num_q_heads = static_cast<int>(Hq);
    p.num_kv_heads = static_cast<int>(Hkv);
    p.group = group;
    p.head_dim = static_cast<int>(D);
    p.block_size = static_cast<int>(block_size);
    p.part = part;
    p.splits = splits;
    p.scale = static_cast<float>(scale);
    const RowTiling tiling = pick_tiling(gt, static_cast<int>(D / vec), vec);
    const dim3 grid(static_cast<unsigned>(Hkv * groups_per_kv), static_cast<unsigned>(B), splits);
    auto launch = [&](auto gt_c, auto lanes_c, auto cpl_c) {
      constexpr int GT = decltype(gt_c)::value, L = decltype(lanes_c)::value;
      constexpr int CPL = decltype(cpl_c)::value;
      if constexpr (tiling_used(GT, vec, L, CPL)) {
        if (gt != GT || tiling.lanes != L || tiling.cpl != CPL) return;
        const size_t smem = kMaxPartition * sizeof(int) +
                            ((kWarps + 1) * GT * D + 2 * kWarps * GT) * sizeof(float);
        launch_pdl(paged_decode_kernel<scalar_t, GT, L, CPL>, grid, kThreads, smem, stream, p);
      }
    };
    auto per_cpl = [&](auto gt_c, auto lanes_c) {
      launch(gt_c, lanes_c, std::integral_constant<int, 1>{});
      launch(gt_c, lanes_c, std::integral_constant<int, 2>{});
      launch(gt_c, lanes_c, std::integral_constant<int, 4>{});
      launch(gt_c, lanes_c, std::integral_constant<int, 8>{});
    };
    auto per_lanes = [&](auto gt_c) {
      per_cpl(gt_c, std::integral_constant<int, 8>{});
      per_cpl(gt_c, std::integral_constant<int, 16>{});
      per_cpl(gt_c, std::integral_constant<int, 32>{});
    };
    if (mma) {
      launch_paged_decode_mma(p, grid, stream);
    } else {
      per_lanes(std::integral_constant<int, 1>{});
      per_lanes(std::integral_constant<int, 2>{});
      per_lanes(std::integral_constant<int, 4>{});
      per_lanes(std::integral_constant<int, 8>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1 && tickets == nullptr) {
      const dim3 mgrid(static_cast<unsigned>(Hq), static_cast<unsigned>(B));
      launch_pdl(paged_decode_merge_kernel<scalar_t>, mgrid, kMergeThreads, 0, stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace splitvl::cuda
