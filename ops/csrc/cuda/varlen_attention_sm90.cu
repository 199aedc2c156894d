// varlen_attention on Hopper tensor cores (wgmma, sm_90a) for bidirectional packed segments:
// the vision tower's attention (4096-token images, 16 heads, head_dim 64 or 72). The caller,
// varlen_attention.cu, runs it when launch_varlen_sm90 accepts the call (varlen_attention_sm90.cuh)
// and its mma.sync kernel otherwise.
//
// A CTA of two consumer warpgroups (256 threads) owns 128 query rows of one head, 64 per
// warpgroup; one CTA per SM (about 140 KB of shared memory at DP = 80). Key/value tiles of 128
// rows stream through three shared-memory stages with cp.async issued by all threads, one
// __syncthreads per tile: while tile n is computed, tile n + 1 is resident and tile n + 2 loads.
// Per warpgroup and tile n:
//   S(n+1) = Q K(n+1)^T is issued (wgmma m64n128k16, Q and K from shared memory, DP/16 k-steps)
//     before the softmax of S(n), so the tensor cores run it during the softmax;
//   online softmax of S(n) in fp32 registers on the accumulator fragments (exp2 with the scale
//     folded into one FFMA; the last tile masks keys >= Lk; O is rescaled when a row max grew);
//   P(n) is rounded to T in registers, already in the register-A layout, and
//   O += P(n) V(n) is issued (wgmma m64nDPk16, A from registers, V from shared memory), then the
//     warpgroup waits for both groups.
// Shared memory layout (every tile, Q, K and V alike): [DP / 8][rows][8], i.e. 16-byte chunks
// of 8 columns; one "core matrix" (8 rows x 16 bytes) is 128 contiguous bytes. wgmma reads it
// with no swizzle: Q and K as K-major operands (head dim = the reduction dim), V - whose rows
// are [key][d], d contiguous - as the MN-major B operand of P V (imm-trans-b = 1, allowed for
// 16-bit types): the same bytes, described transposed, so V needs no transpose pass. Rows past
// a segment's end and columns past head_dim are zero-filled by cp.async; head_dim 72 runs as
// DP = 80 (zero columns add nothing to Q K^T, and the zero V columns are not stored).
// Two neighbouring threads copy the two 16-byte halves of a 32-byte sector of one row: full
// sectors from global memory, two-way shared-memory bank conflicts on the stores.
// Rows past Lq compute on zeros and are not written; a row that sees no key (Lk = 0) writes
// zeros. The kernel body exists only in a compute_90a build (__CUDA_ARCH_FEAT_SM90_ALL); a
// one-thread probe tells the host whether the loaded image has it.
#include "varlen_attention_sm90.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "../attention_sm90.h"
#include "wgmma.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kWarpgroups = 2, kThreads = 128 * kWarpgroups;
constexpr int kBM = 64 * kWarpgroups;  // query rows per CTA
constexpr int kBN = 128;               // keys per tile
constexpr int kStages = 3;

template <typename T, int DP>
constexpr size_t sm90_smem_bytes() {
  return size_t(kBM + kStages * 2 * kBN) * DP * sizeof(T);  // Q, kStages x (K, V)
}

// Rows [0, ROWS) of a row-major matrix (row r at src + r * stride) into a [DP / 8][ROWS][8]
// tile; rows >= valid_rows and columns >= head_dim are zero-filled (`any` is a readable
// address for the skipped copies).
template <typename T, int DP, int ROWS>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t stride, int valid_rows,
                                          int head_dim, const T* any) {
  constexpr int CH = DP / 8, N = ROWS * CH;
  static_assert(CH % 2 == 0 && N % kThreads == 0, "load_tile: chunk pairs per thread");
#pragma unroll
  for (int k = 0; k < N / kThreads; ++k) {
    const int i = threadIdx.x + k * kThreads, pair = i >> 1;
    const int r = pair % ROWS, c = 2 * (pair / ROWS) + (i & 1);
    const bool ok = r < valid_rows && c * 8 < head_dim;
    cp_async16(tile + (c * ROWS + r) * 8, ok ? src + r * stride + c * 8 : any, ok);
  }
}

// online_softmax (attention_common.cuh) without rewriting s: s is a wgmma accumulator, and
// non-wgmma writes to one while the next tile's Q K^T is in flight make ptxas serialize every
// wgmma of the kernel. The probabilities (hidden ones 0: here that form spills less than
// online_softmax's exp2(-inf), which suits the mma.sync kernel) go straight to the A fragments.
template <typename T, bool MASKED, int NT, int ND>
__device__ __forceinline__ void softmax_to_p(const float (&s)[NT][4], uint32_t (&pa)[NT / 2][4],
                                             float (&o)[ND][4], float (&m_i)[2], float (&l_i)[2],
                                             const int (&lim)[2], float scale_log2) {
  float alpha[2], p[NT][4];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float mb = softmax_row_max<MASKED>(s, hr, m_i, lim, scale_log2, alpha);
    float rs = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool hidden = MASKED && nt * 8 + e >= lim[hr];
        const float v = hidden ? 0.f : exp2f(fmaf(s[nt][2 * hr + e], scale_log2, -mb));
        p[nt][2 * hr + e] = v;
        rs += v;
      }
    l_i[hr] = l_i[hr] * alpha[hr] + rs;
  }
  rescale_rows(o, alpha);
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) p_fragment<T>(pa[kk], p, kk);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) varlen_wgmma_kernel(VarlenParams<T> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NT = kBN / 8, ND = DP / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);  // [DP / 8][kBM][8]
  T* KVs = Qs + kBM * DP;                  // stage s: K [DP / 8][kBN][8], then V the same
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kBM;
  const int q_start = p.cu_q[b], Lq = p.cu_q[b + 1] - q_start;
  if (m0 >= Lq) return;
  const int k_start = p.cu_k[b], Lk = p.cu_k[b + 1] - k_start;
  const int kvh = h / p.group, n_tiles = (Lk + kBN - 1) / kBN;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, t4 = threadIdx.x & 3;
  const T* k_rows = p.k + int64_t(k_start) * p.k_s0 + int64_t(kvh) * p.k_s1;
  const T* v_rows = p.v + int64_t(k_start) * p.v_s0 + int64_t(kvh) * p.v_s1;

  auto stage_k = [&](int n) { return KVs + (n % kStages) * 2 * kBN * DP; };
  auto load_kv = [&](int n) {
    const int n0 = n * kBN;
    T* Ks = stage_k(n);
    load_tile<T, DP, kBN>(Ks, k_rows + n0 * p.k_s0, p.k_s0, Lk - n0, p.head_dim, p.q);
    load_tile<T, DP, kBN>(Ks + kBN * DP, v_rows + n0 * p.v_s0, p.v_s0, Lk - n0, p.head_dim, p.q);
  };

  load_tile<T, DP, kBM>(Qs, p.q + int64_t(q_start + m0) * p.q_s0 + int64_t(h) * p.q_s1, p.q_s0,
                        Lq - m0, p.head_dim, p.q);
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();
  if (n_tiles > 1) load_kv(1);
  cp_async_commit();

  // Descriptors (wgmma.cuh). Q of this warpgroup, k-step kk (head-dim columns 16 kk..16 kk + 15):
  // K-major, next 8 rows 128 bytes on (SBO), next 8 columns one chunk plane on (LBO = rows * 16).
  const T* q_wg = Qs + wg * 64 * 8;
  auto q_desc = [&](int kk) { return wgmma::make_desc(q_wg + 2 * kk * kBM * 8, kBM * 16, 128); };
  // K of tile n as the B operand of S = Q K^T (N = keys): K-major like Q.
  auto k_desc = [&](int n, int kk) {
    return wgmma::make_desc(stage_k(n) + 2 * kk * kBN * 8, kBN * 16, 128);
  };
  // V of tile n, keys 16 kk..16 kk + 15, as the B operand of O = P V (K = keys, N = head dim),
  // MN-major: 8 contiguous d per 16-byte row; the next 8 keys 128 bytes on (LBO), the next 8 d
  // one chunk plane on (SBO = kBN * 16).
  auto v_desc = [&](int n, int kk) {
    return wgmma::make_desc(stage_k(n) + kBN * DP + kk * 16 * 8, 128, kBN * 16);
  };
  auto issue_scores = [&](float (&s)[NT][4], int n) {
    wgmma::fence();
    wgmma::mma_ss_n128<T, false>(s, q_desc(0), k_desc(n, 0));
#pragma unroll
    for (int kk = 1; kk < DP / 16; ++kk) wgmma::mma_ss_n128<T, true>(s, q_desc(kk), k_desc(n, kk));
    wgmma::commit_group();
  };

  float o[ND][4] = {};
  float s_a[NT][4] = {}, s_b[NT][4] = {};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;

  // Tile n with S(n) in s; issues S(n + 1) into s_next.
  auto step = [&](int n, float (&s)[NT][4], float (&s_next)[NT][4]) {
    cp_async_wait_all();  // tile n + 1 landed
    wgmma::fence_proxy_async_shared();
    __syncthreads();  // ... for every thread; every warpgroup is done with tile n - 1
    if (n + 1 < n_tiles) issue_scores(s_next, n + 1);
    if (n + 2 < n_tiles) load_kv(n + 2);  // into tile n - 1's stage
    cp_async_commit();
    const int n0 = n * kBN;
    const int lim[2] = {Lk - n0 - 2 * t4, Lk - n0 - 2 * t4};
    uint32_t pa[kBN / 16][4];
    if (n0 + kBN <= Lk) {
      softmax_to_p<T, false>(s, pa, o, m_i, l_i, lim, scale_log2);
    } else {
      softmax_to_p<T, true>(s, pa, o, m_i, l_i, lim, scale_log2);
    }
    wgmma::fence_operands(o);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) wgmma::mma_rs_tn<T, DP>(o, pa[kk], v_desc(n, kk));
    wgmma::commit_group();
    wgmma::wait_group<0>();  // S(n + 1) and O
    wgmma::fence_operands(o);
    wgmma::fence_operands(s_next);
  };

  cp_async_wait_all();  // Q, tiles 0 and 1
  wgmma::fence_proxy_async_shared();
  __syncthreads();
  if (n_tiles > 0) {
    issue_scores(s_a, 0);
    wgmma::wait_group<0>();
    wgmma::fence_operands(s_a);
  }
  for (int n = 0; n < n_tiles; n += 2) {  // two tiles a turn: s_a and s_b swap roles
    step(n, s_a, s_b);
    if (n + 1 < n_tiles) step(n + 1, s_b, s_a);
  }
  store_rows<T>(p, o, l_i, h, q_start, m0 + wg * 64 + warp * 16, Lq);
#endif
}

// Writes 1 when the image the driver loaded for this device is a compute_90a build.
__global__ void sm90a_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

constexpr int kMaxDevices = 64;

// Whether `device` (compute capability 9.0) runs the wgmma kernel body; probed once per device
// with a one-thread kernel and a copy back (a sync, so never while `stream` captures a graph:
// until an eager call has probed, captured calls take the mma.sync kernel).
bool sm90a_body_available(int device, cudaStream_t stream) {
  static std::array<std::atomic<int>, kMaxDevices> known{};  // 0 unknown, 1 no, 2 yes
  if (device < 0 || device >= kMaxDevices) return false;
  const int state = known[device].load(std::memory_order_relaxed);
  if (state != 0) return state == 2;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  if (prop->major != 9 || prop->minor != 0) {
    known[device].store(1, std::memory_order_relaxed);
    return false;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  const at::Tensor flag =
      at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
  sm90a_probe_kernel<<<1, 1, 0, stream>>>(flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool yes = flag.item<int>() == 1;
  known[device].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
}

template <typename T, int DP>
void launch(const VarlenParams<T>& p, int64_t max_seqlen_q, int64_t batch, cudaStream_t stream) {
  constexpr size_t smem = sm90_smem_bytes<T, DP>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(varlen_wgmma_kernel<T, DP>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(ceil_div(max_seqlen_q, kBM), p.num_q_heads, static_cast<unsigned>(batch));
  varlen_wgmma_kernel<T, DP><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
bool qualifies(const VarlenParams<T>& p) {
  const int64_t strides[] = {p.q_s0, p.q_s1, p.k_s0, p.k_s1, p.v_s0, p.v_s1};
  for (int64_t s : strides)
    if (s % 8) return false;
  const void* ptrs[] = {p.q, p.k, p.v, p.out};
  for (const void* ptr : ptrs)
    if (!is_aligned16(ptr)) return false;
  const bool dim_ok = p.head_dim == 64 || p.head_dim == 72 || p.head_dim == 80;
  return !p.causal && !p.paged && dim_ok && p.scale > 0.f;  // scale > 0: maxima over raw scores
}

}  // namespace

template <typename T>
bool launch_varlen_sm90(const VarlenParams<T>& p, int64_t max_seqlen_q, int64_t batch,
                        cudaStream_t stream) {
  if (!attention_sm90_enabled() || !qualifies(p)) return false;
  if (!sm90a_body_available(at::cuda::current_device(), stream)) return false;
  if (p.head_dim == 64)
    launch<T, 64>(p, max_seqlen_q, batch, stream);
  else
    launch<T, 80>(p, max_seqlen_q, batch, stream);
  return true;
}

template bool launch_varlen_sm90<__half>(const VarlenParams<__half>&, int64_t, int64_t, cudaStream_t);
template bool launch_varlen_sm90<__nv_bfloat16>(const VarlenParams<__nv_bfloat16>&, int64_t, int64_t,
                                                cudaStream_t);

}  // namespace splitvl::cuda

// Whether varlen_attention can run the wgmma kernel on CUDA device `device` (for tests and
// benches: the switch aside, the calls that qualify take it exactly when this is true).
TORCH_LIBRARY_FRAGMENT(splitvl_launch, m) {
  m.def("attention_sm90_available(int device) -> bool", [](int64_t device) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    return splitvl::cuda::sm90a_body_available(static_cast<int>(device),
                                               at::cuda::getCurrentCUDAStream());
  });
}
