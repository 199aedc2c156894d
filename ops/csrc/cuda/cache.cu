// reshape_and_cache: scatter new K/V tokens into the paged caches by slot.
#include "common.cuh"
#include "ops.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {
namespace {

struct TokenLayout {
  int64_t token_stride, head_stride;  // elements; the last dim is contiguous
};

// One block per token; threads walk the token's Hkv * D elements in packs of VEC.
template <typename T, int VEC>
__global__ void reshape_and_cache_kernel(const T* key, const T* value,
                                         T* __restrict__ key_cache, T* __restrict__ value_cache,
                                         const int64_t* slot_mapping, TokenLayout Lk,
                                         TokenLayout Lv, int heads, int head_dim, int block_size) {
  using P = Pack<T, VEC>;
  const int64_t t = blockIdx.x;
  pdl_wait();  // k, v, the slots and the cache are written by earlier kernels (pdl.cuh)
  pdl_launch_dependents();
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;  // padding token: nothing to write
  const int64_t block = slot / block_size, offset = slot % block_size;
  const int64_t row = heads * int64_t(head_dim);
  T* kc = key_cache + (block * block_size + offset) * row;
  T* vc = value_cache + (block * block_size + offset) * row;
  const int per_head = head_dim / VEC;
  for (int i = threadIdx.x; i < heads * per_head; i += blockDim.x) {
    const int h = i / per_head, c = (i - h * per_head) * VEC;
    reinterpret_cast<P*>(kc + h * head_dim + c)[0] =
        reinterpret_cast<const P*>(key + t * Lk.token_stride + h * Lk.head_stride + c)[0];
    reinterpret_cast<P*>(vc + h * head_dim + c)[0] =
        reinterpret_cast<const P*>(value + t * Lv.token_stride + h * Lv.head_stride + c)[0];
  }
}

TokenLayout token_layout(const at::Tensor& x, const char* name) {
  SPLITVL_CHECK(x.dim() == 3, "reshape_and_cache: ", name, " must be [T, Hkv, D], got ", x.sizes());
  SPLITVL_CHECK(x.stride(2) == 1 || x.size(2) <= 1, "reshape_and_cache: ", name,
              " needs unit stride in the last dim");
  return {x.stride(0), x.stride(1)};
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "reshape_and_cache";
  check_cuda(key, op, "key");
  for (const at::Tensor& t : {value, key_cache, value_cache, slot_mapping})
    check_same_device(key, t, op);
  const TokenLayout Lk = token_layout(key, "key");
  const TokenLayout Lv = token_layout(value, "value");
  SPLITVL_CHECK(value.sizes() == key.sizes(), op, ": value ", value.sizes(), " != key ", key.sizes());
  SPLITVL_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(), op,
              ": caches must both be [num_blocks, block_size, Hkv, D]");
  SPLITVL_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), op,
              ": caches must be contiguous");
  SPLITVL_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2), op,
              ": cache heads/head_dim ", key_cache.sizes(), " do not match key ", key.sizes());
  SPLITVL_CHECK(key.scalar_type() == key_cache.scalar_type() &&
                  value.scalar_type() == key.scalar_type() &&
                  value_cache.scalar_type() == key.scalar_type(),
              op, ": key, value and caches must share one dtype");
  SPLITVL_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong,
              op, ": slot_mapping must be int64 [T] with T = ", key.size(0));
  const int64_t T = key.size(0);
  const int heads = static_cast<int>(key.size(1)), head_dim = static_cast<int>(key.size(2));
  if (T == 0 || heads == 0 || head_dim == 0) return;
  const at::Tensor slots = slot_mapping.contiguous();
  const c10::cuda::CUDAGuard guard(key.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SPLITVL_DISPATCH_FLOAT(key.scalar_type(), op, [&] {
    constexpr int V = kPack16<scalar_t>;
    const auto* k = reinterpret_cast<const scalar_t*>(key.data_ptr());
    const auto* v = reinterpret_cast<const scalar_t*>(value.data_ptr());
    auto* kc = reinterpret_cast<scalar_t*>(key_cache.data_ptr());
    auto* vc = reinterpret_cast<scalar_t*>(value_cache.data_ptr());
    const bool vec = head_dim % V == 0 && Lk.token_stride % V == 0 && Lk.head_stride % V == 0 &&
                     Lv.token_stride % V == 0 && Lv.head_stride % V == 0 && is_aligned16(k) &&
                     is_aligned16(v) && is_aligned16(kc) && is_aligned16(vc);
    const int work = heads * (vec ? head_dim / V : head_dim);
    const int threads = std::min(512, std::max(32, ((work + 31) / 32) * 32));
    const int block_size = static_cast<int>(key_cache.size(1));
    if (vec)
      launch_pdl(reshape_and_cache_kernel<scalar_t, V>, static_cast<unsigned>(T), threads, 0, stream, k, v, kc, vc,
                 slots.data_ptr<int64_t>(), Lk, Lv, heads, head_dim, block_size);
    else
      launch_pdl(reshape_and_cache_kernel<scalar_t, 1>, static_cast<unsigned>(T), threads, 0, stream, k, v, kc, vc,
                 slots.data_ptr<int64_t>(), Lk, Lv, heads, head_dim, block_size);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
