// rotary_embedding: neox / GPT-J RoPE in place on q and k, partial rotary, and the
// sectioned (mRoPE chunked / interleaved) form. See ops/reference.py.
//
// One block per token: the token's cos/sin row (with each frequency's position
// row already resolved) is staged in shared memory once and reused by every head.
#include "common.cuh"
#include "ops.cuh"
#include "rotary_common.cuh"

namespace splitvl::cuda {
namespace {

struct HeadsLayout {
  int64_t token_stride, head_stride;
  int heads;
};

template <typename T>
__device__ __forceinline__ void rotate_heads(T* __restrict__ base, const HeadsLayout& L, int rot_half,
                                             bool is_neox, const float* cos, const float* sin) {
  const int items = L.heads * rot_half;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int h = it / rot_half, i = it - h * rot_half;
    T* x = base + h * L.head_stride;
    const int i1 = is_neox ? i : 2 * i;
    const int i2 = is_neox ? i + rot_half : 2 * i + 1;
    const float x1 = to_float(x[i1]), x2 = to_float(x[i2]);
    x[i1] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
    x[i2] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

template <typename T>
__global__ void rotary_kernel(const int64_t* __restrict__ positions, int64_t pos_row_stride,
                              int64_t pos_col_stride, T* __restrict__ query, T* __restrict__ key,
                              HeadsLayout Lq, HeadsLayout Lk, const float* __restrict__ cache,
                              int64_t max_pos, int rot_half, bool is_neox, Sections sec) {
  extern __shared__ float cs[];  // [2, rot_half]: cos then sin
  const int64_t t = blockIdx.x;
  stage_cos_sin(cs, positions, pos_row_stride, pos_col_stride, t, cache, max_pos, rot_half, sec);
  __syncthreads();
  rotate_heads(query + t * Lq.token_stride, Lq, rot_half, is_neox, cs, cs + rot_half);
  if (key != nullptr)
    rotate_heads(key + t * Lk.token_stride, Lk, rot_half, is_neox, cs, cs + rot_half);
}

HeadsLayout heads_layout(const at::Tensor& x, int64_t head_size, int64_t tokens, const char* name) {
  constexpr const char* op = "rotary_embedding";
  SPLITVL_CHECK(x.dim() == 2 || x.dim() == 3, op, ": ", name, " must be [T, H*D] or [T, H, D], got ",
              x.sizes());
  SPLITVL_CHECK(x.size(0) == tokens, op, ": ", name, " has ", x.size(0), " tokens, positions have ",
              tokens);
  SPLITVL_CHECK(x.stride(-1) == 1 || x.size(-1) <= 1, op, ": ", name,
              " needs unit stride in the last dim, got strides ", x.strides());
  if (x.dim() == 2) {
    SPLITVL_CHECK(x.size(1) % head_size == 0, op, ": ", name, " width ", x.size(1),
                " is not a multiple of head_size ", head_size);
    return {x.stride(0), head_size, static_cast<int>(x.size(1) / head_size)};
  }
  SPLITVL_CHECK(x.size(2) == head_size, op, ": ", name, " head dim ", x.size(2), " != head_size ",
              head_size);
  return {x.stride(0), x.stride(1), static_cast<int>(x.size(1))};
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox,
                      at::IntArrayRef mrope_section, bool mrope_interleaved) {
  constexpr const char* op = "rotary_embedding";
  check_cuda(query, op, "query");
  check_same_device(query, positions, op);
  check_same_device(query, cos_sin_cache, op);
  SPLITVL_CHECK(head_size > 0, op, ": head_size must be positive");
  SPLITVL_CHECK(cos_sin_cache.dim() == 2, op, ": cos_sin_cache must be [max_pos, rot_dim]");
  const int64_t rot_dim = cos_sin_cache.size(1);
  SPLITVL_CHECK(rot_dim % 2 == 0 && rot_dim <= head_size && rot_dim > 0, op, ": rot_dim ", rot_dim,
              " must be even, positive and <= head_size ", head_size);
  const int rot_half = static_cast<int>(rot_dim / 2);
  const Sections sec = make_sections(mrope_section, mrope_interleaved, rot_half, op);
  check_positions(positions, sec, op);
  const int64_t T = positions.size(-1);
  const HeadsLayout Lq = heads_layout(query, head_size, T, "query");
  HeadsLayout Lk{0, 0, 0};
  if (key.has_value()) {
    check_same_device(query, *key, op);
    SPLITVL_CHECK(key->scalar_type() == query.scalar_type(), op, ": key and query dtypes differ");
    Lk = heads_layout(*key, head_size, T, "key");
  }
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The contract's cache is fp32 and contiguous; anything else is converted once here.
  const at::Tensor cache = cos_sin_cache.to(at::kFloat).contiguous();
  const int64_t pos_row_stride = sec.count ? positions.stride(0) : 0;
  const int64_t pos_col_stride = positions.stride(-1);
  const int work = std::max(Lq.heads, Lk.heads) * rot_half;
  const int threads = std::min(512, std::max(64, ((work + 31) / 32) * 32));
  const size_t smem = 2 * rot_half * sizeof(float);
  SPLITVL_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    auto* q = reinterpret_cast<scalar_t*>(query.data_ptr());
    auto* k = key.has_value() ? reinterpret_cast<scalar_t*>(key->data_ptr()) : nullptr;
    rotary_kernel<scalar_t><<<static_cast<unsigned>(T), threads, smem, stream>>>(
        positions.data_ptr<int64_t>(), pos_row_stride, pos_col_stride, q, k, Lq, Lk,
        cache.data_ptr<float>(), cache.size(0), rot_half, is_neox, sec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
