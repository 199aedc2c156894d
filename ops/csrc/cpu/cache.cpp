// reshape_and_cache: scatter new K/V tokens into the paged cache by slot mapping.
#include <cstring>

#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

void check_kv(const at::Tensor& x, const at::Tensor& cache, const char* name) {
  SPLITVL_CHECK_CPU(x);
  SPLITVL_CHECK_CPU(cache);
  SPLITVL_CHECK_FLOAT_DTYPE(x);
  SPLITVL_CHECK(cache.is_contiguous(), "reshape_and_cache: ", name, "_cache must be contiguous");
  SPLITVL_CHECK(x.dim() == 3 && x.stride(2) == 1, "reshape_and_cache: ", name,
              " must be [T, Hkv, D] with unit last stride, got ", x.sizes(), " strides ",
              x.strides());
  SPLITVL_CHECK(cache.dim() == 4 && cache.size(2) == x.size(1) && cache.size(3) == x.size(2),
              "reshape_and_cache: ", name, "_cache ", cache.sizes(),
              " must be [num_blocks, block_size, ", x.size(1), ", ", x.size(2), "]");
  SPLITVL_CHECK(cache.scalar_type() == x.scalar_type(), "reshape_and_cache: ", name, "_cache dtype ",
              cache.scalar_type(), " != ", name, " dtype ", x.scalar_type());
}

template <typename T>
void copy_token(T* dst, const T* src, int64_t heads, int64_t head_stride, int64_t d) {
  if (head_stride == d) {
    std::memcpy(dst, src, sizeof(T) * heads * d);
    return;
  }
  for (int64_t h = 0; h < heads; ++h) std::memcpy(dst + h * d, src + h * head_stride, sizeof(T) * d);
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_kv(key, key_cache, "key");
  check_kv(value, value_cache, "value");
  SPLITVL_CHECK(value.sizes() == key.sizes(), "reshape_and_cache: value ", value.sizes(),
              " != key ", key.sizes());
  SPLITVL_CHECK(value_cache.sizes() == key_cache.sizes(), "reshape_and_cache: value_cache ",
              value_cache.sizes(), " != key_cache ", key_cache.sizes());
  SPLITVL_CHECK_CPU(slot_mapping);
  SPLITVL_CHECK_DTYPE(slot_mapping, at::kLong);
  SPLITVL_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0),
              "reshape_and_cache: slot_mapping ", slot_mapping.sizes(), " must be [T=", key.size(0), "]");
  const int64_t tokens = key.size(0), heads = key.size(1), d = key.size(2);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  const int64_t slot_stride = slot_mapping.stride(0);
  for (int64_t t = 0; t < tokens; ++t)
    SPLITVL_CHECK(slots[t * slot_stride] < num_slots, "reshape_and_cache: slot ",
                slots[t * slot_stride], " of token ", t, " is outside the cache (", num_slots,
                " slots)");
  if (tokens == 0 || heads * d == 0) return;
  SPLITVL_DISPATCH_FLOATING(key.scalar_type(), "splitvl_reshape_and_cache", [&] {
    const scalar_t* k = key.const_data_ptr<scalar_t>();
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    scalar_t* kc = key_cache.data_ptr<scalar_t>();
    scalar_t* vc = value_cache.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain_for(2 * heads * d), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t slot = slots[t * slot_stride];
        if (slot < 0) continue;  // padding token
        copy_token(kc + slot * heads * d, k + t * key.stride(0), heads, key.stride(1), d);
        copy_token(vc + slot * heads * d, v + t * value.stride(0), heads, value.stride(1), d);
      }
    });
  });
}

}  // namespace splitvl::cpu
