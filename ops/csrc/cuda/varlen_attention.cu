// varlen_attention: attention over packed sequences (LLM prefill with a paged
// prefix, bidirectional ViT segments), GQA, bottom-right causal masks.
//
// fp16/bf16: a flash-attention-2 style kernel on mma.sync m16n8k16 tensor cores.
// A CTA of WARPS warps owns 16 * WARPS query rows of one head, 16 per warp: 8 warps,
// or 4 when 8 would give fewer CTAs than SMs (DP = 256: always 4, for registers).
// K/V tiles of kBN keys (64; 32 for DP >= 128, for registers) stream through two
// shared-memory stages with cp.async: tile n + 1 loads while tile n is computed,
// one __syncthreads per tile. Q fragments stay in registers for DP = 64 and are
// re-read from shared memory otherwise. Softmax is online in fp32 registers: row
// maxima over unscaled scores (hence scale > 0), the scale folded into one FFMA
// before exp2, the mask applied only on tiles a warp sees partially, tiles a warp
// cannot see skipped (causal), and the output rescaled only when a row max of the
// warp grew. fp32 (and shapes the tensor-core path cannot take) use a simple
// warp-per-query kernel.
#include "attention_common.cuh"
#include "ops.cuh"
#include "varlen_attention_sm90.cuh"

namespace splitvl::cuda {
namespace {

constexpr int key_tile(int DP) { return DP >= 128 ? 32 : 64; }

// Two CTAs of 8 warps (or four of 4) per SM, at most 128 registers a thread; DP = 256
// needs more registers (one CTA, 4 warps).
constexpr int min_ctas_per_sm(int DP, int warps) { return DP == 256 ? 1 : 16 / warps; }

template <typename T, int DP, int WARPS>
constexpr size_t mma_smem_bytes() {
  return size_t(WARPS * 16 + 4 * key_tile(DP)) * (DP + 8) * sizeof(T);  // Q, 2 x K, 2 x V
}

// Query rows [m0, m0 + ROWS) of head h into Qs; rows >= Lq and columns >= head_dim
// are zero-filled.
template <typename T, int DP, int ROWS, int THREADS>
__device__ __forceinline__ void load_q_async(T* Qs, const VarlenParams<T>& p, int h, int q_start,
                                             int m0, int Lq) {
  constexpr int LD = DP + 8, CH = DP / 8, N = ROWS * CH;
#pragma unroll
  for (int k = 0; k < (N + THREADS - 1) / THREADS; ++k) {
    const int i = threadIdx.x + k * THREADS;
    if (N % THREADS == 0 || i < N) {
      const int r = i / CH, c = i - r * CH;
      const bool ok = m0 + r < Lq && c * 8 < p.head_dim;
      const T* src =
          ok ? p.q + int64_t(q_start + m0 + r) * p.q_s0 + int64_t(h) * p.q_s1 + c * 8 : p.q;
      cp_async16(Qs + r * LD + c * 8, src, ok);
    }
  }
}

// Key and value rows [n0, n0 + BN) into one pipeline stage; rows >= n_end and
// columns >= head_dim are zero-filled.
template <typename T, int DP, int BN, int THREADS>
__device__ __forceinline__ void load_kv_async(T* Ks, T* Vs, const VarlenParams<T>& p, int b,
                                              int kvh, int k_start, int n0, int n_end) {
  constexpr int LD = DP + 8, CH = DP / 8, N = BN * CH;
#pragma unroll
  for (int k = 0; k < (N + THREADS - 1) / THREADS; ++k) {
    const int i = threadIdx.x + k * THREADS;
    if (N % THREADS == 0 || i < N) {
      const int r = i / CH, c = i - r * CH, j = n0 + r;
      const bool ok = j < n_end && c * 8 < p.head_dim;
      const T* ksrc = ok ? kv_row(p, false, b, kvh, k_start, j) + c * 8 : p.q;
      const T* vsrc = ok ? kv_row(p, true, b, kvh, k_start, j) + c * 8 : p.q;
      cp_async16(Ks + r * LD + c * 8, ksrc, ok);
      cp_async16(Vs + r * LD + c * 8, vsrc, ok);
    }
  }
}

template <typename T, int DP, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, min_ctas_per_sm(DP, WARPS))
    varlen_mma_kernel(VarlenParams<T> p) {
  constexpr int kThreads = WARPS * 32, kBM = WARPS * 16, kBN = key_tile(DP), LD = DP + 8;
  constexpr bool kQInRegs = DP <= 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kBM * LD;      // [2][kBN][LD]
  T* Vs = Ks + 2 * kBN * LD;  // [2][kBN][LD]
  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBM;  // heavy causal tiles first
  const int q_start = p.cu_q[b], Lq = p.cu_q[b + 1] - q_start;
  if (m0 >= Lq) return;
  const int k_start = p.cu_k[b], Lk = p.cu_k[b + 1] - k_start;
  const int kvh = h / p.group, shift = Lk - Lq;
  const int n_end = p.causal ? min(Lk, m0 + kBM + shift) : Lk;
  const int n_tiles = n_end > 0 ? (n_end + kBN - 1) / kBN : 0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3, mi = lane >> 3, ri = lane & 7;

  load_q_async<T, DP, kBM, kThreads>(Qs, p, h, q_start, m0, Lq);
  if (n_tiles > 0) load_kv_async<T, DP, kBN, kThreads>(Ks, Vs, p, b, kvh, k_start, 0, n_end);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // This warp's rows [r0, r0 + 16): all of them see keys < vis_all, some see keys < vis_any
  // (none when every row is past Lq); row r0 + g + 8 * hr sees keys < lim_row[hr].
  const int r0 = m0 + warp * 16;
  const int vis_all = p.causal ? min(Lk, r0 + shift + 1) : Lk;
  const int vis_any = r0 >= Lq ? 0 : p.causal ? min(Lk, r0 + 16 + shift) : Lk;
  int lim_row[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) lim_row[hr] = p.causal ? min(Lk, r0 + g + 8 * hr + shift + 1) : Lk;

  const T* q_frag = Qs + (warp * 16 + (mi & 1) * 8 + ri) * LD + (mi >> 1) * 8;
  uint32_t qf[kQInRegs ? DP / 16 : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) ldmatrix_x4(qf[kk], q_frag + kk * 16);
  }

  float o[DP / 8][4] = {};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  for (int n = 0; n < n_tiles; ++n) {
    const int stage = n & 1, n0 = n * kBN;
    if (n + 1 < n_tiles)
      load_kv_async<T, DP, kBN, kThreads>(Ks + (stage ^ 1) * kBN * LD, Vs + (stage ^ 1) * kBN * LD,
                                          p, b, kvh, k_start, n0 + kBN, n_end);
    cp_async_commit();

    if (n0 < vis_any) {
      const T* Kt = Ks + stage * kBN * LD;
      const T* Vt = Vs + stage * kBN * LD;
      float s[kBN / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        uint32_t a[4];
        if constexpr (kQInRegs) {
#pragma unroll
          for (int x = 0; x < 4; ++x) a[x] = qf[kk][x];
        } else {
          ldmatrix_x4(a, q_frag + kk * 16);
        }
#pragma unroll
        for (int np = 0; np < kBN / 16; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, Kt + (np * 16 + (mi >> 1) * 8 + ri) * LD + kk * 16 + (mi & 1) * 8);
          mma_16816<T>(s[2 * np], a, bk[0], bk[1]);
          mma_16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
        }
      }
      if (n0 + kBN <= vis_all) {
        online_softmax<false>(s, o, m_i, l_i, lim_row, scale_log2);
      } else {
        const int lim[2] = {lim_row[0] - n0 - 2 * t4, lim_row[1] - n0 - 2 * t4};
        online_softmax<true>(s, o, m_i, l_i, lim, scale_log2);
      }

#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[4];
        p_fragment<T>(a, s, kk);
#pragma unroll
        for (int np = 0; np < DP / 16; ++np) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, Vt + (kk * 16 + (mi & 1) * 8 + ri) * LD + np * 16 + (mi >> 1) * 8);
          mma_16816<T>(o[2 * np], a, bv[0], bv[1]);
          mma_16816<T>(o[2 * np + 1], a, bv[2], bv[3]);
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();  // tile n + 1 landed; every warp is done with tile n
  }

  store_rows<T>(p, o, l_i, h, q_start, r0, Lq);
}

// Fallback: one warp per query row, online softmax over keys one at a time.
constexpr int kSimpleWarps = 4;

template <typename T>
__global__ void varlen_simple_kernel(VarlenParams<T> p) {
  extern __shared__ float sm[];  // per warp: q [D], acc [D]
  const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q_start = p.cu_q[b], Lq = p.cu_q[b + 1] - q_start;
  const int i = blockIdx.x * kSimpleWarps + warp;
  if (i >= Lq) return;
  const int k_start = p.cu_k[b], Lk = p.cu_k[b + 1] - k_start;
  const int kvh = h / p.group, D = p.head_dim;
  const int lim = p.causal ? min(Lk, i + Lk - Lq + 1) : Lk;
  float* q = sm + warp * 2 * D;
  float* acc = q + D;
  const T* qrow = p.q + int64_t(q_start + i) * p.q_s0 + int64_t(h) * p.q_s1;
  for (int d = lane; d < D; d += 32) {
    q[d] = to_float(qrow[d]) * p.scale;
    acc[d] = 0.f;
  }
  __syncwarp();
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j < lim; ++j) {
    const T* krow = kv_row(p, false, b, kvh, k_start, j);
    float dot = 0.f;
    for (int d = lane; d < D; d += 32) dot += q[d] * to_float(krow[d]);
    dot = warp_sum(dot);
    const float m_new = fmaxf(m, dot);
    const float alpha = expf(m - m_new), pj = expf(dot - m_new);
    l = l * alpha + pj;
    m = m_new;
    const T* vrow = kv_row(p, true, b, kvh, k_start, j);
    for (int d = lane; d < D; d += 32) acc[d] = acc[d] * alpha + pj * to_float(vrow[d]);
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* dst = p.out + (int64_t(q_start + i) * p.num_q_heads + h) * D;
  for (int d = lane; d < D; d += 32) dst[d] = from_float<T>(acc[d] * inv);
}

int padded_head_dim(int64_t D) { return D <= 64 ? 64 : D <= 80 ? 80 : D <= 128 ? 128 : 256; }

template <typename T, int DP, int WARPS>
void launch_mma(const VarlenParams<T>& p, int64_t max_seqlen_q, int64_t B, cudaStream_t stream) {
  constexpr size_t smem = mma_smem_bytes<T, DP, WARPS>();
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(varlen_mma_kernel<T, DP, WARPS>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(ceil_div(max_seqlen_q, WARPS * 16), p.num_q_heads, static_cast<unsigned>(B));
  varlen_mma_kernel<T, DP, WARPS><<<grid, WARPS * 32, smem, stream>>>(p);
}

// 8 warps (128 query rows) per CTA, unless that gives fewer CTAs than SMs; DP = 256 keeps
// 4 warps for registers.
template <typename T, int DP>
void launch_mma(const VarlenParams<T>& p, int64_t max_seqlen_q, int64_t B, cudaStream_t stream) {
  if constexpr (DP == 256) {
    launch_mma<T, DP, 4>(p, max_seqlen_q, B, stream);
  } else {
    const int64_t ctas8 = int64_t(ceil_div(max_seqlen_q, 128)) * p.num_q_heads * B;
    if (max_seqlen_q > 64 && ctas8 >= at::cuda::getCurrentDeviceProperties()->multiProcessorCount)
      launch_mma<T, DP, 8>(p, max_seqlen_q, B, stream);
    else
      launch_mma<T, DP, 4>(p, max_seqlen_q, B, stream);
  }
}

template <typename T>
bool tensor_core_ok(const VarlenParams<T>& p) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    const int64_t strides[] = {p.q_s0, p.q_s1, p.k_s0, p.k_s1, p.v_s0, p.v_s1};
    for (int64_t s : strides)
      if (s % 8) return false;
    const void* ptrs[] = {p.q, p.k, p.v, p.key_cache, p.value_cache, p.out};
    for (const void* ptr : ptrs)
      if (!is_aligned16(ptr)) return false;
    // scale > 0: the kernel takes row maxima over unscaled scores.
    return p.head_dim % 8 == 0 && p.head_dim <= 256 && p.scale > 0.f;
  }
}

constexpr const char* kOp = "varlen_attention";

void check_kv(const at::Tensor& q, const at::Tensor& x, const char* name) {
  check_same_device(q, x, kOp);
  SPLITVL_CHECK(x.scalar_type() == q.scalar_type(), kOp, ": ", name, " dtype differs from query");
  SPLITVL_CHECK(x.stride(-1) == 1, kOp, ": ", name, " needs unit stride in the last dim");
  SPLITVL_CHECK(x.size(-1) == q.size(2) && q.size(1) % x.size(-2) == 0, kOp, ": ", name, " ",
              x.sizes(), " does not fit query ", q.sizes(), " (same D, Hq multiple of Hkv)");
}

void check_cu(const at::Tensor& q, const at::Tensor& cu, const char* name, int64_t B) {
  check_same_device(q, cu, kOp);
  SPLITVL_CHECK(cu.dim() == 1 && cu.scalar_type() == at::kInt && cu.is_contiguous() &&
                  cu.size(0) == B + 1,
              kOp, ": ", name, " must be contiguous int32 [B+1] with B=", B);
}

}  // namespace

void varlen_attention(at::Tensor& out, const at::Tensor& query,
                      const std::optional<at::Tensor>& key,
                      const std::optional<at::Tensor>& value, const at::Tensor& cu_seqlens_q,
                      const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                      double scale, bool causal, const std::optional<at::Tensor>& key_cache,
                      const std::optional<at::Tensor>& value_cache,
                      const std::optional<at::Tensor>& block_tables) {
  check_cuda(query, kOp, "query");
  SPLITVL_CHECK(query.dim() == 3 && query.stride(2) == 1, kOp,
              ": query must be [Tq, Hq, D] with unit last stride, got ", query.sizes());
  SPLITVL_CHECK(out.is_contiguous() && out.sizes() == query.sizes() &&
                  out.scalar_type() == query.scalar_type(),
              kOp, ": out must be contiguous with the query's shape and dtype");
  check_same_device(query, out, kOp);
  const bool paged = block_tables.has_value();
  SPLITVL_CHECK(paged != key.has_value() && key.has_value() == value.has_value() &&
                  key_cache.has_value() == paged && value_cache.has_value() == paged,
              kOp, ": pass either key/value or key_cache/value_cache/block_tables");
  SPLITVL_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, kOp, ": negative max_seqlen");
  const int64_t B = cu_seqlens_q.size(0) - 1;
  SPLITVL_CHECK(B >= 0, kOp, ": cu_seqlens_q must have B+1 >= 1 entries");
  check_cu(query, cu_seqlens_q, "cu_seqlens_q", B);
  check_cu(query, cu_seqlens_k, "cu_seqlens_k", B);
  const at::Tensor& kx = paged ? *key_cache : *key;
  const at::Tensor& vx = paged ? *value_cache : *value;
  check_kv(query, kx, paged ? "key_cache" : "key");
  check_kv(query, vx, paged ? "value_cache" : "value");
  SPLITVL_CHECK(kx.sizes() == vx.sizes(), kOp, ": key and value shapes differ");
  if (paged) {
    SPLITVL_CHECK(kx.dim() == 4 && kx.is_contiguous() && vx.is_contiguous(), kOp,
                ": caches must be contiguous [num_blocks, block_size, Hkv, D]");
    SPLITVL_CHECK(block_tables->dim() == 2 && block_tables->scalar_type() == at::kInt &&
                    block_tables->size(0) == B,
                kOp, ": block_tables must be int32 [B, max_blocks]");
    check_same_device(query, *block_tables, kOp);
  } else {
    SPLITVL_CHECK(kx.dim() == 3, kOp, ": key/value must be [Tk, Hkv, D]");
  }
  if (query.size(0) == 0 || B == 0 || max_seqlen_q == 0 || query.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(query.scalar_type(), kOp, [&] {
    using T = scalar_t;
    VarlenParams<T> p{};
    p.q = reinterpret_cast<const T*>(query.data_ptr());
    p.q_s0 = query.stride(0);
    p.q_s1 = query.stride(1);
    if (paged) {
      p.key_cache = reinterpret_cast<const T*>(kx.data_ptr());
      p.value_cache = reinterpret_cast<const T*>(vx.data_ptr());
      p.block_tables = block_tables->data_ptr<int>();
      p.bt_s0 = block_tables->stride(0);
      p.bt_s1 = block_tables->stride(1);
      p.block_size = static_cast<int>(kx.size(1));
    } else {
      p.k = reinterpret_cast<const T*>(kx.data_ptr());
      p.v = reinterpret_cast<const T*>(vx.data_ptr());
      p.k_s0 = kx.stride(0);
      p.k_s1 = kx.stride(1);
      p.v_s0 = vx.stride(0);
      p.v_s1 = vx.stride(1);
    }
    p.cu_q = cu_seqlens_q.data_ptr<int>();
    p.cu_k = cu_seqlens_k.data_ptr<int>();
    p.out = reinterpret_cast<T*>(out.data_ptr());
    p.num_q_heads = static_cast<int>(query.size(1));
    p.num_kv_heads = static_cast<int>(kx.size(-2));
    p.group = p.num_q_heads / p.num_kv_heads;
    p.head_dim = static_cast<int>(query.size(2));
    p.scale = static_cast<float>(scale);
    p.causal = causal;
    p.paged = paged;
    if (launch_varlen_sm90(p, max_seqlen_q, B, stream)) return;  // the wgmma kernel took it
    if (tensor_core_ok(p)) {
      if constexpr (!std::is_same_v<T, float>) {
        switch (padded_head_dim(p.head_dim)) {
          case 64: launch_mma<T, 64>(p, max_seqlen_q, B, stream); break;
          case 80: launch_mma<T, 80>(p, max_seqlen_q, B, stream); break;
          case 128: launch_mma<T, 128>(p, max_seqlen_q, B, stream); break;
          default: launch_mma<T, 256>(p, max_seqlen_q, B, stream); break;
        }
      }
    } else {
      const dim3 grid(ceil_div(max_seqlen_q, kSimpleWarps), p.num_q_heads, static_cast<unsigned>(B));
      const size_t smem = size_t(kSimpleWarps) * 2 * p.head_dim * sizeof(float);
      SPLITVL_CHECK(smem <= 48 * 1024, kOp, ": head_dim ", p.head_dim, " too large");
      varlen_simple_kernel<T><<<grid, kSimpleWarps * 32, smem, stream>>>(p);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
