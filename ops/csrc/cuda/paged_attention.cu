// paged_attention_decode: one query token per sequence over its paged KV cache.
//
// Flash-decoding: grid (kv head x query-head group, sequence, context split).
// A CTA serves the query heads that share one KV head (GQA), so each K/V row is
// read once for all of them. Long contexts are cut into partitions whose partial
// results (max, sum, normalised output) a second kernel merges. The number of
// partitions comes from the block table width, so the host never reads seq_lens.
#include "common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroupLanes = 4;  // lanes sharing one key row in the QK phase
constexpr int kMaxHeadDim = 256;

template <typename T>
struct DecodeParams {
  const T* q;
  int64_t q_s0, q_s1;
  const T* key_cache;  // [num_blocks, block_size, Hkv, D]
  const T* value_cache;
  const int* block_tables;
  int64_t bt_s0, bt_s1;
  const int* seq_lens;
  T* out;           // [B, Hq, D]
  float* part_out;  // [B, Hq, splits, D]
  float* part_max;  // [B, Hq, splits]
  float* part_sum;
  int num_q_heads, num_kv_heads, group, head_dim, block_size, part, splits;
  float scale;
};

template <typename T>
__device__ __forceinline__ const T* cache_row(const DecodeParams<T>& p, const T* cache,
                                              const int* table, int t, int kv_head) {
  const int64_t phys = table[(t / p.block_size) * p.bt_s1];
  const int64_t slot = phys * p.block_size + t % p.block_size;
  return cache + (slot * p.num_kv_heads + kv_head) * p.head_dim;
}

// Scores of the partition's tokens for GT query heads -> logits [GT, part].
template <typename T, int GT>
__device__ __forceinline__ void score_tokens(const DecodeParams<T>& p, const int* table,
                                             int kv_head, int start, int end, const float* q_s,
                                             float* logits) {
  constexpr int VEC = kPack16<T>;
  constexpr int MAXC = kMaxHeadDim / VEC / kGroupLanes;
  using P = Pack<T, VEC>;
  const int D = p.head_dim, chunks = D / VEC;
  const int gl = threadIdx.x % kGroupLanes, group_id = threadIdx.x / kGroupLanes;
  const int groups = blockDim.x / kGroupLanes;
  // The loop bound is block-uniform (not per group): the shuffles below need
  // every lane of the warp, also those whose token is past the end.
  for (int base = start; base < end; base += groups) {
    const int t = base + group_id;
    const bool valid = t < end;
    P kv[MAXC];
    if (valid) {
      const P* krow = reinterpret_cast<const P*>(cache_row(p, p.key_cache, table, t, kv_head));
#pragma unroll
      for (int k = 0; k < MAXC; ++k)
        if (gl + k * kGroupLanes < chunks) kv[k] = krow[gl + k * kGroupLanes];
    }
    float dots[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      dots[g] = 0.f;
#pragma unroll
      for (int k = 0; k < MAXC; ++k) {
        const int c = gl + k * kGroupLanes;
        if (valid && c < chunks) {
          const float* qv = q_s + g * D + c * VEC;
#pragma unroll
          for (int j = 0; j < VEC; ++j) dots[g] += qv[j] * to_float(kv[k].v[j]);
        }
      }
#pragma unroll
      for (int o = 1; o < kGroupLanes; o <<= 1) dots[g] += __shfl_xor_sync(0xffffffffu, dots[g], o);
    }
    if (valid && gl == 0) {
#pragma unroll
      for (int g = 0; g < GT; ++g) logits[g * p.part + (t - start)] = dots[g];
    }
  }
}

// acc_s [GT, D] += sum_t probs[g, t] * V[t].
template <typename T, int GT>
__device__ __forceinline__ void weigh_values(const DecodeParams<T>& p, const int* table,
                                             int kv_head, int start, int end, const float* probs,
                                             float* acc_s) {
  constexpr int VEC = kPack16<T>;
  using P = Pack<T, VEC>;
  const int D = p.head_dim, chunks = D / VEC;
  const int rows = blockDim.x / chunks;
  const int c = threadIdx.x % chunks, r = threadIdx.x / chunks;
  if (r >= rows) return;
  float acc[GT][VEC] = {};
#pragma unroll 4
  for (int t = start + r; t < end; t += rows) {
    const P v = reinterpret_cast<const P*>(cache_row(p, p.value_cache, table, t, kv_head))[c];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float w = probs[g * p.part + (t - start)];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[g][j] += w * to_float(v.v[j]);
    }
  }
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(&acc_s[g * D + c * VEC + j], acc[g][j]);
}

template <typename T, int GT>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(DecodeParams<T> p) {
  extern __shared__ float smem[];
  const int groups_per_kv = (p.group + GT - 1) / GT;
  const int kv_head = blockIdx.x / groups_per_kv, hg = blockIdx.x % groups_per_kv;
  const int b = blockIdx.y, split = blockIdx.z;
  const int h0 = kv_head * p.group + hg * GT;
  const int heads = min(GT, p.group - hg * GT);
  const int seq_len = max(p.seq_lens[b], 0);
  const int start = split * p.part;
  if (start >= seq_len && split > 0) return;  // unused partition: the merge skips it
  const int end = min(seq_len, start + p.part);
  const int D = p.head_dim;
  float* q_s = smem;                   // [GT, D], pre-scaled
  float* logits = q_s + GT * D;        // [GT, part]
  float* acc_s = logits + GT * p.part;  // [GT, D]
  float* stats = acc_s + GT * D;       // [GT, 2]: max, sum
  for (int i = threadIdx.x; i < GT * D; i += blockDim.x) {
    const int g = i / D, d = i - g * D;
    q_s[i] = g < heads ? to_float(p.q[b * p.q_s0 + (h0 + g) * p.q_s1 + d]) * p.scale : 0.f;
    acc_s[i] = 0.f;
  }
  __syncthreads();
  const int* table = p.block_tables + b * p.bt_s0;
  score_tokens<T, GT>(p, table, kv_head, start, end, q_s, logits);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < GT) {  // one warp per query head: max, exp in place, sum
    float* l = logits + warp * p.part;
    float mx = -INFINITY;
    for (int i = lane; i < end - start; i += 32) mx = fmaxf(mx, l[i]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int i = lane; i < end - start; i += 32) {
      const float e = expf(l[i] - mx);
      l[i] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      stats[2 * warp] = mx;
      stats[2 * warp + 1] = sum;
    }
  }
  __syncthreads();
  weigh_values<T, GT>(p, table, kv_head, start, end, logits, acc_s);
  __syncthreads();
  for (int i = threadIdx.x; i < heads * D; i += blockDim.x) {
    const int g = i / D, d = i - g * D;
    const int64_t bh = int64_t(b) * p.num_q_heads + h0 + g;
    const float sum = stats[2 * g + 1];
    const float o = sum > 0.f ? acc_s[i] / sum : 0.f;
    if (p.splits == 1) {
      p.out[bh * D + d] = from_float<T>(o);
    } else {
      p.part_out[(bh * p.splits + split) * D + d] = o;
      if (d == 0) {
        p.part_max[bh * p.splits + split] = stats[2 * g];
        p.part_sum[bh * p.splits + split] = sum;
      }
    }
  }
}

// grid (Hq, B): merge the used partitions of one (sequence, head).
template <typename T>
__global__ void paged_decode_merge_kernel(DecodeParams<T> p) {
  extern __shared__ float w[];  // [splits]
  __shared__ float scratch[32];
  const int h = blockIdx.x, b = blockIdx.y, D = p.head_dim;
  const int seq_len = max(p.seq_lens[b], 0);
  const int used = (seq_len + p.part - 1) / p.part;
  const int64_t bh = int64_t(b) * p.num_q_heads + h;
  const float* pmax = p.part_max + bh * p.splits;
  const float* psum = p.part_sum + bh * p.splits;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < used; s += blockDim.x) mx = fmaxf(mx, pmax[s]);
  mx = block_max(mx, scratch);
  float total = 0.f;
  for (int s = threadIdx.x; s < used; s += blockDim.x) {
    w[s] = psum[s] * expf(pmax[s] - mx);
    total += w[s];
  }
  total = block_sum(total, scratch);  // also orders the writes of w before the reads below
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < used; ++s) acc += w[s] * p.part_out[(bh * p.splits + s) * D + d];
    p.out[bh * D + d] = from_float<T>(acc * inv);
  }
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

// Partition length: 512 tokens, shorter while the grid would not fill the GPU twice.
int pick_partition(int64_t ctas, int64_t max_ctx) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int part = 512;
  while (part > 128 && ctas * ceil_div(max_ctx, part) < 2 * sms) part /= 2;
  return part;
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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int group = static_cast<int>(Hq / Hkv);
  const int gt = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
  const int64_t groups_per_kv = (group + gt - 1) / gt;
  const int part = pick_partition(Hkv * groups_per_kv * B, std::max<int64_t>(max_ctx, 1));
  const int splits = std::max(1, ceil_div(max_ctx, part));
  at::Tensor part_out, part_max, part_sum;
  if (splits > 1) {
    const auto f32 = query.options().dtype(at::kFloat);
    part_out = at::empty({B, Hq, splits, D}, f32);
    part_max = at::empty({B, Hq, splits}, f32);
    part_sum = at::empty({B, Hq, splits}, f32);
  }
  SPLITVL_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    DecodeParams<scalar_t> p{};
    p.q = reinterpret_cast<const scalar_t*>(query.data_ptr());
    p.q_s0 = query.stride(0);
    p.q_s1 = query.stride(1);
    p.key_cache = reinterpret_cast<const scalar_t*>(key_cache.data_ptr());
    p.value_cache = reinterpret_cast<const scalar_t*>(value_cache.data_ptr());
    p.block_tables = block_tables.data_ptr<int>();
    p.bt_s0 = block_tables.stride(0);
    p.bt_s1 = block_tables.stride(1);
    p.seq_lens = seq_lens.data_ptr<int>();
    p.out = reinterpret_cast<scalar_t*>(out.data_ptr());
    p.part_out = splits > 1 ? part_out.data_ptr<float>() : nullptr;
    p.part_max = splits > 1 ? part_max.data_ptr<float>() : nullptr;
    p.part_sum = splits > 1 ? part_sum.data_ptr<float>() : nullptr;
    p.num_q_heads = static_cast<int>(Hq);
    p.num_kv_heads = static_cast<int>(Hkv);
    p.group = group;
    p.head_dim = static_cast<int>(D);
    p.block_size = static_cast<int>(block_size);
    p.part = part;
    p.splits = splits;
    p.scale = static_cast<float>(scale);
    const dim3 grid(static_cast<unsigned>(Hkv * groups_per_kv), static_cast<unsigned>(B), splits);
    auto launch = [&](auto gt_c) {
      constexpr int GT = decltype(gt_c)::value;
      const size_t smem = (2 * GT * D + GT * part + 2 * GT) * sizeof(float);
      paged_decode_kernel<scalar_t, GT><<<grid, kThreads, smem, stream>>>(p);
    };
    if (gt == 1) launch(std::integral_constant<int, 1>{});
    else if (gt == 2) launch(std::integral_constant<int, 2>{});
    else if (gt == 4) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 8>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const dim3 mgrid(static_cast<unsigned>(Hq), static_cast<unsigned>(B));
      paged_decode_merge_kernel<scalar_t><<<mgrid, 128, splits * sizeof(float), stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace splitvl::cuda
