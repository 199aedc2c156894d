// Grouped expert GEMMs over aligned pair blocks (semantics: ops/reference_moe.py):
//   moe_gate_up: out[r] = silu(a W_gate[e]^T) * (a W_up[e]^T), a = x[pair / k]
//   moe_down:    out[r] = (h[r] W_down[e]^T) * topk_weights.flat[pair]
//
// bf16/fp16 with K % 8 == 0 run on tensor cores (mma.sync m16n8k16, fp32
// accumulate). Blocks of 16 rows (few pairs per expert: decode) take the
// fragment-streaming path of moe_gemv.cu. Larger blocks (64 or 128 rows, the
// alignment picks them by pairs per expert): one CTA owns one expert block (all BM
// rows) and 128 weight rows, so every weight tile is read once per block and
// reused by BM rows. 8 warps as 2 (rows) x 4 (weight rows); each warp holds a
// BM/2 x 32 accumulator tile, fed by ldmatrix from padded smem rows (the 8 row
// addresses of an ldmatrix phase fall in distinct banks); rows and weights stream
// through a 3-stage cp.async pipeline. Blocks beyond the device-side total exit.
// fp32, or K not a multiple of 8, takes a plain CUDA-core path.
#include "attention_common.cuh"
#include "moe_gemm_common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps: 2 along the block's rows x 4 along weight rows
constexpr int kWarpsN = 4;
constexpr int kBN = 128;  // weight rows per CTA; gated: per warp 16 gate rows, then their up rows
// 3 stages of 64 columns: 108 KB of smem at BM 128, so two CTAs (16 warps) share an SM.
constexpr int kBK = 64;
constexpr int kStages = 3;
constexpr int kPitch = kBK + 8;  // smem row pitch (elements): 144 bytes, ldmatrix conflict-free

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Output columns per CTA: gated tiles hold gate and up rows of the same 64 columns.
template <bool GATED>
constexpr int kTileCols = GATED ? kBN / 2 : kBN;

// Global weight row of smem row r (-1: beyond N). Gated: each warp's 32 rows are 16
// gate rows (columns col0 + 16 * (r / 32) + r % 16), then the up rows of those columns.
template <bool GATED>
__device__ __forceinline__ int weight_row(int r, int col0, int n) {
  if constexpr (GATED) {
    const int col = col0 + 16 * (r >> 5) + (r & 15);
    return col < n ? ((r & 16) ? n + col : col) : -1;
  } else {
    return col0 + r < n ? col0 + r : -1;
  }
}

// One pipeline stage: BM gathered rows and kBN weight rows of kBK columns from k0;
// chunks past K (or past N, or padding rows) are zero-filled.
template <typename T, int BM, bool GATED>
__device__ __forceinline__ void load_stage(T* as, const T* const* a_rows, const T* a,
                                           const T* w_expert, int col0, int n, int k_dim,
                                           int k0) {
  constexpr int kChunks = kBK / 8;
  T* ws = as + BM * kPitch;
  for (int c = threadIdx.x; c < BM * kChunks; c += kThreads) {
    const int r = c / kChunks, kk = k0 + (c % kChunks) * 8;
    const T* src = a_rows[r];
    const bool ok = src != nullptr && kk < k_dim;
    cp_async16(as + r * kPitch + (c % kChunks) * 8, ok ? src + kk : a, ok);
  }
  for (int c = threadIdx.x; c < kBN * kChunks; c += kThreads) {
    const int r = c / kChunks, kk = k0 + (c % kChunks) * 8;
    const int grow = weight_row<GATED>(r, col0, n);
    const bool ok = grow >= 0 && kk < k_dim;
    cp_async16(ws + r * kPitch + (c % kChunks) * 8,
               ok ? w_expert + int64_t(grow) * k_dim + kk : w_expert, ok);
  }
}

// Two adjacent output columns (col, col + 1) of one row; a pair store when both fit.
template <typename T>
__device__ __forceinline__ void store2(T* row, int col, int n, float v0, float v1) {
  if (col + 1 < n && (reinterpret_cast<uintptr_t>(row + col) & 3) == 0) {
    *reinterpret_cast<uint32_t*>(row + col) = pack2<T>(v0, v1);
  } else {
    if (col < n) row[col] = from_float<T>(v0);
    if (col + 1 < n) row[col + 1] = from_float<T>(v1);
  }
}

template <typename T, int BM, bool GATED>
__global__ void __launch_bounds__(kThreads, 2)
    moe_gemm_mma_kernel(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ w,
                        const float* __restrict__ pair_weights, BlockArgs args, int top_k,
                        int k_dim, int n) {
  static_assert(BM % 32 == 0 && BM <= kThreads, "2 warp rows of 16-row m-tiles; block_rows");
  constexpr int MT = BM / 32;  // m-tiles of 16 rows per warp
  constexpr int kStageElems = (BM + kBN) * kPitch;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ const T* a_rows[BM];
  __shared__ int row_pairs[BM];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int expert = block_rows<T, BM>(args, a, top_k, k_dim, a_rows, row_pairs);
  if (expert < 0) return;  // uniform over the CTA
  __syncthreads();
  const int col0 = blockIdx.y * kTileCols<GATED>;
  const T* w_expert = w + int64_t(expert) * (GATED ? 2 : 1) * n * k_dim;
  const int k_tiles = (k_dim + kBK - 1) / kBK;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  // ldmatrix row addresses: A x4 = rows 0-15 at k 0 / 8; B x4 = two n-tiles at k 0 / 8.
  const int a_off = (wm * (BM / 2) + (lane & 15)) * kPitch + (lane >> 4) * 8;
  const int b_off = BM * kPitch + (wn * 32 + (lane & 7) + ((lane >> 4) << 3)) * kPitch +
                    ((lane >> 3) & 1) * 8;
  float acc[MT][4][4] = {};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles)
      load_stage<T, BM, GATED>(smem + s * kStageElems, a_rows, a, w_expert, col0, n, k_dim, s * kBK);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed; stage kt - 1 (overwritten next) is consumed
    const int next = kt + kStages - 1;
    if (next < k_tiles)
      load_stage<T, BM, GATED>(smem + (next % kStages) * kStageElems, a_rows, a, w_expert, col0,
                               n, k_dim, next * kBK);
    cp_async_commit();
    const T* stage = smem + (kt % kStages) * kStageElems;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[MT][4], bf[2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(af[mt], stage + a_off + mt * 16 * kPitch + ks);
#pragma unroll
      for (int p = 0; p < 2; ++p) ldmatrix_x4(bf[p], stage + b_off + p * 16 * kPitch + ks);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          mma_16816<T>(acc[mt][nt], af[mt], bf[nt >> 1][(nt & 1) * 2], bf[nt >> 1][(nt & 1) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // Accumulator (mt, nt, i): row wm * BM/2 + mt*16 + g + 8*(i >= 2), column 2*t4 + (i & 1)
  // of the warp's n-tile nt (gated: n-tiles 0, 1 gate, 2, 3 the matching up).
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * BM;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = wm * (BM / 2) + mt * 16 + g + 8 * half;
      const int pair = row_pairs[m];
      if (pair < 0) continue;
      T* dst = out + (row0 + m) * n;
      if constexpr (GATED) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const float* gate = acc[mt][nt] + 2 * half;
          const float* up = acc[mt][nt + 2] + 2 * half;
          store2<T>(dst, col0 + wn * 16 + nt * 8 + 2 * t4, n, silu(gate[0]) * up[0],
                    silu(gate[1]) * up[1]);
        }
      } else {
        const float scale = pair_weights[pair];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const float* c = acc[mt][nt] + 2 * half;
          store2<T>(dst, col0 + wn * 32 + nt * 8 + 2 * t4, n, c[0] * scale, c[1] * scale);
        }
      }
    }
  }
}

// CUDA-core path (fp32, or rows not 16-byte aligned): one warp per output column.
template <typename T, bool GATED>
__global__ void moe_gemm_simple_kernel(T* __restrict__ out, const T* __restrict__ a,
                                       const T* __restrict__ w,
                                       const float* __restrict__ pair_weights, BlockArgs args,
                                       int top_k, int k_dim, int n) {
  const int blk = blockIdx.x;
  if (blk * args.block >= *args.total) return;
  const int expert = args.block_experts[blk];
  if (expert < 0) return;
  const int col = blockIdx.y * (blockDim.x / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (col >= n) return;
  const T* w_expert = w + int64_t(expert) * (GATED ? 2 : 1) * n * k_dim;
  const T* w0 = w_expert + int64_t(col) * k_dim;
  const T* w1 = w_expert + int64_t(n + col) * k_dim;  // up row (gated only)
  for (int m = 0; m < args.block; ++m) {
    const int64_t row = int64_t(blk) * args.block + m;
    const int pair = args.sorted[row];
    if (pair >= args.pairs) continue;
    const T* x = a + (top_k > 0 ? int64_t(pair / top_k) : row) * k_dim;
    float s0 = 0.f, s1 = 0.f;
    for (int k = lane; k < k_dim; k += 32) {
      const float xv = to_float(x[k]);
      s0 += xv * to_float(w0[k]);
      if constexpr (GATED) s1 += xv * to_float(w1[k]);
    }
    s0 = warp_sum(s0);
    if constexpr (GATED) s1 = warp_sum(s1);
    if (lane == 0)
      out[row * n + col] = from_float<T>(GATED ? silu(s0) * s1 : s0 * pair_weights[pair]);
  }
}

template <typename T, int BM, bool GATED>
void launch_mma(T* out, const T* a, const T* w, const float* pw, const BlockArgs& args, int top_k,
                int k_dim, int n, int blocks, cudaStream_t stream) {
  const size_t smem = size_t(kStages) * (BM + kBN) * kPitch * sizeof(T);
  auto kernel = moe_gemm_mma_kernel<T, BM, GATED>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  // All of L1 as shared memory: two 110 KB CTAs per SM need it (cp.async.cg skips L1).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      int(cudaSharedmemCarveoutMaxShared)));
  const dim3 grid(blocks, ceil_div(n, kTileCols<GATED>));
  kernel<<<grid, kThreads, smem, stream>>>(out, a, w, pw, args, top_k, k_dim, n);
}

// Shared by both ops: a = x (top_k > 0, rows by token) or h (top_k = 0, rows by position).
template <bool GATED>
void run_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& weight,
              const float* pair_weights, const at::Tensor& sorted_pairs,
              const at::Tensor& block_experts, const at::Tensor& total_padded, int64_t pairs,
              int top_k, const char* op) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &out, &weight, &sorted_pairs, &block_experts, &total_padded})
    check_same_device(a, *t, op);
  SPLITVL_CHECK(a.is_contiguous() && weight.is_contiguous() && out.is_contiguous(), op,
                ": input, weight and out must be contiguous");
  SPLITVL_CHECK(weight.scalar_type() == a.scalar_type() && out.scalar_type() == a.scalar_type(),
                op, ": input, weight and out must share a dtype");
  SPLITVL_CHECK(sorted_pairs.scalar_type() == at::kInt && block_experts.scalar_type() == at::kInt &&
                    total_padded.scalar_type() == at::kInt && total_padded.numel() == 1,
                op, ": alignment tensors must be int32");
  const int64_t capacity = sorted_pairs.numel(), blocks = block_experts.numel();
  SPLITVL_CHECK(blocks > 0 ? capacity % blocks == 0 : capacity == 0, op,
                ": sorted_pairs must hold a whole number of blocks");
  const int n = static_cast<int>(out.size(1)), k_dim = static_cast<int>(weight.size(2));
  if (blocks == 0 || n == 0) return;
  const int block = static_cast<int>(capacity / blocks);
  const BlockArgs args{sorted_pairs.data_ptr<int32_t>(), block_experts.data_ptr<int32_t>(),
                       total_padded.data_ptr<int32_t>(), static_cast<int>(pairs), block};
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool tensor_cores = a.scalar_type() != at::kFloat && k_dim % 8 == 0 &&
                            is_aligned16(a.data_ptr()) && is_aligned16(weight.data_ptr()) &&
                            (block == 16 || block == 64 || block == 128);
  SPLITVL_DISPATCH_FLOAT(a.scalar_type(), op, [&] {
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x = reinterpret_cast<const scalar_t*>(a.data_ptr());
    const auto* w = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (tensor_cores) {
        if (block == 16) launch_moe_gemv<scalar_t, GATED>(o, x, w, pair_weights, args, top_k, k_dim, n, blocks, stream);
        else if (block == 64) launch_mma<scalar_t, 64, GATED>(o, x, w, pair_weights, args, top_k, k_dim, n, blocks, stream);
        else launch_mma<scalar_t, 128, GATED>(o, x, w, pair_weights, args, top_k, k_dim, n, blocks, stream);
        return;
      }
    }
    const dim3 grid(blocks, (n + 7) / 8);
    moe_gemm_simple_kernel<scalar_t, GATED><<<grid, 256, 0, stream>>>(o, x, w, pair_weights, args,
                                                                     top_k, k_dim, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void moe_gate_up(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                 const at::Tensor& sorted_pairs, const at::Tensor& block_experts,
                 const at::Tensor& total_padded, int64_t top_k) {
  constexpr const char* op = "moe_gate_up";
  check_cuda(x, op, "x");
  SPLITVL_CHECK(x.dim() == 2 && weight.dim() == 3 && weight.size(2) == x.size(1) &&
                    weight.size(1) % 2 == 0,
                op, ": x [T, H] and weight [E, 2I, H] expected, got ", x.sizes(), " and ",
                weight.sizes());
  SPLITVL_CHECK(out.dim() == 2 && out.size(0) == sorted_pairs.numel() &&
                    out.size(1) == weight.size(1) / 2,
                op, ": out must be [capacity, I], got ", out.sizes());
  SPLITVL_CHECK(top_k >= 1, op, ": top_k must be >= 1");
  run_gemm<true>(out, x, weight, nullptr, sorted_pairs, block_experts, total_padded,
                 x.size(0) * top_k, static_cast<int>(top_k), op);
}

void moe_down(at::Tensor& out, const at::Tensor& h, const at::Tensor& weight,
              const at::Tensor& topk_weights, const at::Tensor& sorted_pairs,
              const at::Tensor& block_experts, const at::Tensor& total_padded) {
  constexpr const char* op = "moe_down";
  check_cuda(h, op, "h");
  check_same_device(h, topk_weights, op);
  SPLITVL_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(), op,
                ": topk_weights must be contiguous fp32 [T, k]");
  SPLITVL_CHECK(h.dim() == 2 && weight.dim() == 3 && weight.size(2) == h.size(1) &&
                    h.size(0) == sorted_pairs.numel(),
                op, ": h [capacity, I] and weight [E, H, I] expected, got ", h.sizes(), " and ",
                weight.sizes());
  SPLITVL_CHECK(out.dim() == 2 && out.size(0) == h.size(0) && out.size(1) == weight.size(1), op,
                ": out must be [capacity, H], got ", out.sizes());
  run_gemm<false>(out, h, weight, topk_weights.data_ptr<float>(), sorted_pairs, block_experts,
                  total_padded, topk_weights.numel(), 0, op);
}

}  // namespace splitvl::cuda
