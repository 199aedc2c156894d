// Grouped expert GEMMs over aligned pair blocks (semantics: ops/reference_moe.py):
//   moe_gate_up: out[r] = silu(a W_gate[e]^T) * (a W_up[e]^T), a = x[pair / k]
//   moe_down:    out[r] = (h[r] W_down[e]^T) * topk_weights.flat[pair]
//
// bf16/fp16 with K % 8 == 0 run on tensor cores (mma.sync m16n8k16, fp32
// accumulate). Blocks of 16 rows (few pairs per expert: decode) take the
// fragment-streaming path of moe_gemv.cu. Larger blocks: one CTA owns one expert
// block (all BM rows) and 64 weight rows, so every weight byte is read once per
// block; weights and rows stream through a 4-stage cp.async pipeline. Blocks
// beyond the device-side total exit at once.
// fp32, or K not a multiple of 8, takes a plain CUDA-core path.
#include "moe_gemm_common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWeightRows = 64;  // per CTA; gated: 32 gate rows then the 32 matching up rows
constexpr int kBK = 64;
constexpr int kStages = 4;
constexpr int kPitch = kBK + 8;  // smem row pitch (elements): conflict-free fragment loads

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Global weight row of smem row r (-1: beyond N). Gated: rows < 32 are gate rows
// col0 + r, the rest up rows N + col0 + r - 32; else col0 + r.
template <bool GATED>
__device__ __forceinline__ int weight_row(int r, int col0, int n) {
  if constexpr (GATED) {
    const int col = col0 + (r & 31);
    return col < n ? (r < 32 ? col : n + col) : -1;
  } else {
    return col0 + r < n ? col0 + r : -1;
  }
}

template <typename T, int BM, bool GATED>
__global__ void __launch_bounds__(kThreads)
    moe_gemm_mma_kernel(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ w,
                        const float* __restrict__ pair_weights, BlockArgs args, int top_k,
                        int k_dim, int n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ const T* a_rows[BM];
  __shared__ int row_pairs[BM];
  T* smem = reinterpret_cast<T*>(smem_raw);
  constexpr int kStageElems = (BM + kWeightRows) * kPitch;
  const int expert = block_rows<T, BM>(args, a, top_k, k_dim, a_rows, row_pairs);
  if (expert < 0) return;  // uniform over the CTA
  __syncthreads();
  const int col0 = blockIdx.y * (GATED ? kWeightRows / 2 : kWeightRows);
  const T* w_expert = w + int64_t(expert) * (GATED ? 2 : 1) * n * k_dim;
  const int k_tiles = (k_dim + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    T* as = smem + stage * kStageElems;
    T* ws = as + BM * kPitch;
    const int k0 = kt * kBK;
    for (int c = threadIdx.x; c < BM * (kBK / 8); c += kThreads) {
      const int r = c >> 3, kk = k0 + (c & 7) * 8;
      const T* src = a_rows[r];
      const bool ok = src != nullptr && kk < k_dim;
      cp_async16(as + r * kPitch + (c & 7) * 8, ok ? src + kk : a, ok);
    }
    for (int c = threadIdx.x; c < kWeightRows * (kBK / 8); c += kThreads) {
      const int r = c >> 3, kk = k0 + (c & 7) * 8;
      const int grow = weight_row<GATED>(r, col0, n);
      const bool ok = grow >= 0 && kk < k_dim;
      cp_async16(ws + r * kPitch + (c & 7) * 8, ok ? w_expert + int64_t(grow) * k_dim + kk : w, ok);
    }
  };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  // This warp's two n-tiles (8 weight rows each): gated = gate and up of the same 8 columns.
  const int tile_row[2] = {GATED ? 8 * warp : 16 * warp, GATED ? 32 + 8 * warp : 16 * warp + 8};
  float acc[BM / 16][2][4] = {};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();
    const T* as = smem + (kt % kStages) * kStageElems;
    const T* ws = as + BM * kPitch;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      unsigned af[BM / 16][4];
#pragma unroll
      for (int mt = 0; mt < BM / 16; ++mt) {
        const T* base = as + (mt * 16 + g) * kPitch + ks + 2 * t4;
        af[mt][0] = *reinterpret_cast<const unsigned*>(base);
        af[mt][1] = *reinterpret_cast<const unsigned*>(base + 8 * kPitch);
        af[mt][2] = *reinterpret_cast<const unsigned*>(base + 8);
        af[mt][3] = *reinterpret_cast<const unsigned*>(base + 8 * kPitch + 8);
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const T* wb = ws + (tile_row[nt] + g) * kPitch + ks + 2 * t4;
        const unsigned b0 = *reinterpret_cast<const unsigned*>(wb);
        const unsigned b1 = *reinterpret_cast<const unsigned*>(wb + 8);
#pragma unroll
        for (int mt = 0; mt < BM / 16; ++mt) mma16816<T>(acc[mt][nt], af[mt], b0, b1);
      }
    }
  }
  cp_async_wait<0>();

  // Accumulator (mt, nt, i) is row mt*16 + g + 8*(i >= 2), column 2*t4 + (i & 1) of its n-tile.
  const int64_t row0 = int64_t(blockIdx.x) * BM;
#pragma unroll
  for (int mt = 0; mt < BM / 16; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = mt * 16 + g + (i >= 2 ? 8 : 0);
      const int pair = row_pairs[m];
      if (pair < 0) continue;
      if constexpr (GATED) {
        const int col = col0 + 8 * warp + 2 * t4 + (i & 1);
        if (col < n)
          out[(row0 + m) * n + col] = from_float<T>(silu(acc[mt][0][i]) * acc[mt][1][i]);
      } else {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int col = col0 + tile_row[nt] + 2 * t4 + (i & 1);
          if (col < n) out[(row0 + m) * n + col] = from_float<T>(acc[mt][nt][i] * pair_weights[pair]);
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
  const size_t smem = size_t(kStages) * (BM + kWeightRows) * kPitch * sizeof(T);
  auto kernel = moe_gemm_mma_kernel<T, BM, GATED>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int cols = GATED ? kWeightRows / 2 : kWeightRows;
  const dim3 grid(blocks, (n + cols - 1) / cols);
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
                            (block == 16 || block == 32 || block == 64);
  SPLITVL_DISPATCH_FLOAT(a.scalar_type(), op, [&] {
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    const auto* x = reinterpret_cast<const scalar_t*>(a.data_ptr());
    const auto* w = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (tensor_cores) {
        if (block == 16) launch_moe_gemv<scalar_t, GATED>(o, x, w, pair_weights, args, top_k, k_dim, n, blocks, stream);
        else if (block == 32) launch_mma<scalar_t, 32, GATED>(o, x, w, pair_weights, args, top_k, k_dim, n, blocks, stream);
        else launch_mma<scalar_t, 64, GATED>(o, x, w, pair_weights, args, top_k, k_dim, n, blocks, stream);
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
