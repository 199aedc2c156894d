// Rotary position embedding (neox or GPT-J pairs), plain and sectioned (mRoPE,
// ViT 2-D), in place on strided query/key views; partial rotary supported. Also
// qk_norm_rope: the per-head q/k RMSNorm followed by the rotation, and
// qk_norm_rope_and_cache: that, then the cache write.
#include <utility>
#include <vector>

#include "../qk_norm_rope_checks.h"
#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

// Row of sectioned positions each frequency takes (see ops/reference.py: mrope_rows).
std::vector<int64_t> frequency_rows(int64_t rot_half, at::IntArrayRef sections, bool interleaved) {
  std::vector<int64_t> rows(rot_half, 0);
  if (sections.empty()) return rows;
  int64_t total = 0;
  for (int64_t s : sections) {
    SPLITVL_CHECK(s >= 0, "rotary_embedding: mrope_section entries must be >= 0, got ", sections);
    total += s;
  }
  SPLITVL_CHECK(total == rot_half, "rotary_embedding: sum(mrope_section)=", total,
              " must equal rot_dim/2=", rot_half);
  if (interleaved) {
    SPLITVL_CHECK(sections.size() == 3, "rotary_embedding: interleaved mrope needs 3 sections, got ",
                sections);
    for (int64_t i = 0; i < rot_half; ++i) {
      if (i % 3 == 1 && i < 3 * sections[1]) rows[i] = 1;
      else if (i % 3 == 2 && i < 3 * sections[2]) rows[i] = 2;
    }
    return rows;
  }
  int64_t i = 0;
  for (size_t s = 0; s < sections.size(); ++s)
    for (int64_t n = 0; n < sections[s]; ++n) rows[i++] = static_cast<int64_t>(s);
  return rows;
}

// A [T, H, D] view of a [T, H*D] or [T, H, D] tensor: token and head strides.
struct HeadView {
  int64_t heads, token_stride, head_stride;
};

HeadView head_view(const at::Tensor& x, int64_t tokens, int64_t head_size, const char* name) {
  SPLITVL_CHECK_CPU(x);
  SPLITVL_CHECK_LAST_CONTIG(x);
  SPLITVL_CHECK(x.dim() == 2 || x.dim() == 3, "rotary_embedding: ", name,
              " must be [T, H*D] or [T, H, D], got ", x.sizes());
  SPLITVL_CHECK(x.size(0) == tokens, "rotary_embedding: ", name, " has ", x.size(0),
              " tokens, positions have ", tokens);
  if (x.dim() == 3) {
    SPLITVL_CHECK(x.size(2) == head_size, "rotary_embedding: ", name, " head dim ", x.size(2),
                " != head_size ", head_size);
    return {x.size(1), x.stride(0), x.stride(1)};
  }
  SPLITVL_CHECK(x.size(1) % head_size == 0, "rotary_embedding: ", name, " width ", x.size(1),
              " is not a multiple of head_size ", head_size);
  return {x.size(1) / head_size, x.stride(0), head_size};
}

template <typename T>
void rotate_heads(T* base, const HeadView& v, int64_t t, const float* cos, const float* sin,
                  int64_t rot_half, bool is_neox) {
  for (int64_t h = 0; h < v.heads; ++h) {
    T* x = base + t * v.token_stride + h * v.head_stride;
    for (int64_t i = 0; i < rot_half; ++i) {
      const int64_t i1 = is_neox ? i : 2 * i;
      const int64_t i2 = is_neox ? i + rot_half : 2 * i + 1;
      const float x1 = static_cast<float>(x[i1]);
      const float x2 = static_cast<float>(x[i2]);
      x[i1] = static_cast<T>(x1 * cos[i] - x2 * sin[i]);
      x[i2] = static_cast<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox, at::IntArrayRef mrope_section,
                      bool mrope_interleaved) {
  SPLITVL_CHECK_CPU(positions);
  SPLITVL_CHECK_CPU(cos_sin_cache);
  SPLITVL_CHECK_FLOAT_DTYPE(query);
  SPLITVL_CHECK_DTYPE(cos_sin_cache, at::kFloat);
  SPLITVL_CHECK_CONTIG(cos_sin_cache);
  SPLITVL_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
              "rotary_embedding: positions must be int64 or int32, got ", positions.scalar_type());
  SPLITVL_CHECK(cos_sin_cache.dim() == 2, "rotary_embedding: cos_sin_cache must be [max_pos, rot_dim]");
  const int64_t rot_dim = cos_sin_cache.size(1), rot_half = rot_dim / 2;
  const int64_t max_pos = cos_sin_cache.size(0);
  SPLITVL_CHECK(rot_dim % 2 == 0 && rot_dim <= head_size && rot_dim > 0, "rotary_embedding: rot_dim ",
              rot_dim, " must be even, positive and <= head_size ", head_size);
  const int64_t sections = mrope_section.empty() ? 1 : static_cast<int64_t>(mrope_section.size());
  SPLITVL_CHECK(mrope_section.empty() ? positions.dim() == 1
                                    : positions.dim() == 2 && positions.size(0) == sections,
              "rotary_embedding: positions ", positions.sizes(), " must be [T] (plain) or [",
              sections, ", T] (mrope_section ", mrope_section, ")");
  const int64_t tokens = positions.size(-1);
  const HeadView qv = head_view(query, tokens, head_size, "query");
  HeadView kv{0, 0, 0};
  if (key.has_value()) {
    kv = head_view(*key, tokens, head_size, "key");
    SPLITVL_CHECK(key->scalar_type() == query.scalar_type(), "rotary_embedding: key dtype ",
                key->scalar_type(), " != query dtype ", query.scalar_type());
  }
  if (tokens == 0) return;
  const std::vector<int64_t> rows = frequency_rows(rot_half, mrope_section, mrope_interleaved);
  const at::Tensor pos = positions.to(at::kLong);
  const int64_t* pos_data = pos.const_data_ptr<int64_t>();
  const int64_t pos_row_stride = pos.dim() == 2 ? pos.stride(0) : 0, pos_stride = pos.stride(-1);
  for (int64_t s = 0; s < sections; ++s)
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t p = pos_data[s * pos_row_stride + t * pos_stride];
      SPLITVL_CHECK(p >= 0 && p < max_pos, "rotary_embedding: position ", p, " outside the cache [0, ",
                  max_pos, ")");
    }
  const float* cache = cos_sin_cache.const_data_ptr<float>();
  SPLITVL_DISPATCH_FLOATING(query.scalar_type(), "splitvl_rotary_embedding", [&] {
    scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* k = key.has_value() ? key->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, tokens, grain_for(rot_dim * (qv.heads + kv.heads)), [&](int64_t b, int64_t e) {
      std::vector<float> cos(rot_half), sin(rot_half);
      for (int64_t t = b; t < e; ++t) {
        for (int64_t i = 0; i < rot_half; ++i) {
          const int64_t p = pos_data[rows[i] * pos_row_stride + t * pos_stride];
          cos[i] = cache[p * rot_dim + i];
          sin[i] = cache[p * rot_dim + rot_half + i];
        }
        rotate_heads(q, qv, t, cos.data(), sin.data(), rot_half, is_neox);
        if (k != nullptr) rotate_heads(k, kv, t, cos.data(), sin.data(), rot_half, is_neox);
      }
    });
  });
}

}  // namespace splitvl::cpu

namespace splitvl::cpu {

// The two kernels in a row: each head normalized (rms_norm's numbers), then rotated.
void qk_norm_rope(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& q_weight,
                  const at::Tensor& k_weight, double epsilon, const at::Tensor& cos_sin_cache, bool is_neox,
                  at::IntArrayRef mrope_section, bool mrope_interleaved) {
  check_qk_norm_rope(positions, query, key, q_weight, k_weight, cos_sin_cache);
  for (auto [x, w] : {std::pair<at::Tensor*, const at::Tensor*>{&query, &q_weight}, {&key, &k_weight}}) {
    at::Tensor normed = at::empty(x->sizes(), x->options());
    rms_norm(normed, *x, *w, epsilon);
    x->copy_(normed);
  }
  const std::optional<at::Tensor> k(key);
  rotary_embedding(positions, query, k, query.size(2), cos_sin_cache, is_neox, mrope_section, mrope_interleaved);
}

// qk_norm_rope then reshape_and_cache (which checks the slots against the cache).
void qk_norm_rope_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& q_weight, const at::Tensor& k_weight, double epsilon,
                            const at::Tensor& cos_sin_cache, at::Tensor& key_cache, at::Tensor& value_cache,
                            const at::Tensor& slot_mapping, bool is_neox, at::IntArrayRef mrope_section,
                            bool mrope_interleaved) {
  check_qk_norm_rope_and_cache(positions, query, key, value, q_weight, k_weight, cos_sin_cache, key_cache,
                               value_cache, slot_mapping);
  qk_norm_rope(positions, query, key, q_weight, k_weight, epsilon, cos_sin_cache, is_neox, mrope_section,
               mrope_interleaved);
  reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
}

}  // namespace splitvl::cpu
