// Attention: varlen prefill (packed or paged keys, causal bottom-right or
// bidirectional) and paged decode. One task per (query token, kv head) handles
// the whole GQA group so each key row is read once; online softmax in fp32 over
// key tiles.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

constexpr int64_t kKeyTile = 32;

// Keys/values of one sequence: packed rows, or the paged cache through a block table.
template <typename T>
struct KeySource {
  const T* k;
  const T* v;
  int64_t k_tok_stride, k_head_stride, v_tok_stride, v_head_stride;
  const int32_t* block_table;  // nullptr when packed
  int64_t block_size;

  int64_t row(int64_t j) const {
    return block_table == nullptr ? j : block_table[j / block_size] * block_size + j % block_size;
  }
};

struct Scratch {
  std::vector<float> q, acc, scores, max, sum;
  Scratch(int64_t group, int64_t d)
      : q(group * d), acc(group * d), scores(group * kKeyTile), max(group), sum(group) {}
};

// out[g, :] = softmax(scale * q[g] . K^T) V over the first n_keys keys, for the
// `group` query heads sharing kv head `kv_head`.
template <typename T>
void attend_group(const KeySource<T>& src, int64_t kv_head, int64_t n_keys, const T* q,
                  int64_t q_head_stride, int64_t group, int64_t d, float scale, T* out,
                  Scratch& s) {
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < d; ++i) s.q[g * d + i] = static_cast<float>(q[g * q_head_stride + i]) * scale;
  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  std::fill(s.max.begin(), s.max.end(), -std::numeric_limits<float>::infinity());
  std::fill(s.sum.begin(), s.sum.end(), 0.f);
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyTile) {
    const int64_t len = std::min(kKeyTile, n_keys - j0);
    for (int64_t jj = 0; jj < len; ++jj) {
      const T* kr = src.k + src.row(j0 + jj) * src.k_tok_stride + kv_head * src.k_head_stride;
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = s.q.data() + g * d;
        float dot = 0.f;
        for (int64_t i = 0; i < d; ++i) dot += qg[i] * static_cast<float>(kr[i]);
        s.scores[g * kKeyTile + jj] = dot;
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* sc = s.scores.data() + g * kKeyTile;
      const float new_max = std::max(s.max[g], *std::max_element(sc, sc + len));
      const float correction = std::exp(s.max[g] - new_max);
      s.sum[g] *= correction;
      for (int64_t i = 0; i < d; ++i) s.acc[g * d + i] *= correction;
      s.max[g] = new_max;
      for (int64_t jj = 0; jj < len; ++jj) {
        sc[jj] = std::exp(sc[jj] - new_max);
        s.sum[g] += sc[jj];
      }
    }
    for (int64_t jj = 0; jj < len; ++jj) {
      const T* vr = src.v + src.row(j0 + jj) * src.v_tok_stride + kv_head * src.v_head_stride;
      for (int64_t g = 0; g < group; ++g) {
        const float p = s.scores[g * kKeyTile + jj];
        float* acc = s.acc.data() + g * d;
        for (int64_t i = 0; i < d; ++i) acc[i] += p * static_cast<float>(vr[i]);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = n_keys > 0 ? 1.f / s.sum[g] : 0.f;  // no visible key -> zeros
    for (int64_t i = 0; i < d; ++i) out[g * d + i] = static_cast<T>(s.acc[g * d + i] * inv);
  }
}

void check_query_out(const at::Tensor& out, const at::Tensor& query, const char* op) {
  SPLITVL_CHECK_CPU(query);
  SPLITVL_CHECK_CPU(out);
  SPLITVL_CHECK_FLOAT_DTYPE(query);
  SPLITVL_CHECK(query.dim() == 3 && query.stride(2) == 1, op,
              ": query must be [T, Hq, D] with unit last stride, got ", query.sizes(), " strides ",
              query.strides());
  SPLITVL_CHECK_CONTIG(out);
  SPLITVL_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(), op,
              ": out ", out.sizes(), " ", out.scalar_type(), " must match query ", query.sizes(),
              " ", query.scalar_type());
}

void check_kv_pair(const at::Tensor& k, const at::Tensor& v, const at::Tensor& query, int64_t dims,
                   const char* what, const char* op) {
  SPLITVL_CHECK_CPU(k);
  SPLITVL_CHECK_CPU(v);
  SPLITVL_CHECK(k.dim() == dims && k.stride(-1) == 1 && v.sizes() == k.sizes() && v.stride(-1) == 1,
              op, ": ", what, " must be ", dims, "-d with unit last stride and equal shapes, got ",
              k.sizes(), " and ", v.sizes());
  SPLITVL_CHECK(k.scalar_type() == query.scalar_type() && v.scalar_type() == query.scalar_type(), op,
              ": ", what, " dtype ", k.scalar_type(), "/", v.scalar_type(), " != query dtype ",
              query.scalar_type());
  const int64_t hkv = k.size(-2);
  SPLITVL_CHECK(k.size(-1) == query.size(2), op, ": ", what, " head dim ", k.size(-1),
              " != query head dim ", query.size(2));
  SPLITVL_CHECK(hkv > 0 && query.size(1) % hkv == 0, op, ": query heads ", query.size(1),
              " must be a multiple of kv heads ", hkv);
}

// Every sequence's first `lengths[b]` tokens must map to valid blocks.
void check_block_tables(const at::Tensor& block_tables, const at::Tensor& cache,
                        const std::vector<int64_t>& lengths, const char* op) {
  SPLITVL_CHECK_CPU(block_tables);
  SPLITVL_CHECK_DTYPE(block_tables, at::kInt);
  SPLITVL_CHECK(block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
                  block_tables.size(0) == static_cast<int64_t>(lengths.size()),
              op, ": block_tables must be [B=", lengths.size(), ", max_blocks] int32 with unit last "
              "stride, got ", block_tables.sizes());
  SPLITVL_CHECK_CONTIG(cache);
  const int64_t num_blocks = cache.size(0), block_size = cache.size(1);
  const int32_t* bt = block_tables.const_data_ptr<int32_t>();
  for (size_t b = 0; b < lengths.size(); ++b) {
    const int64_t needed = (lengths[b] + block_size - 1) / block_size;
    SPLITVL_CHECK(needed <= block_tables.size(1), op, ": sequence ", b, " has ", lengths[b],
                " keys, more than its ", block_tables.size(1), " blocks of ", block_size, " hold");
    for (int64_t i = 0; i < needed; ++i) {
      const int32_t block = bt[b * block_tables.stride(0) + i];
      SPLITVL_CHECK(block >= 0 && block < num_blocks, op, ": block_tables[", b, ", ", i, "]=", block,
                  " outside the cache's ", num_blocks, " blocks");
    }
  }
}

// cu_seqlens [B+1] int32 -> B lengths; checks 0-start, monotonicity, total and max.
std::vector<int64_t> seq_lengths(const at::Tensor& cu, int64_t total, int64_t max_len,
                                 const char* name) {
  SPLITVL_CHECK_CPU(cu);
  SPLITVL_CHECK_DTYPE(cu, at::kInt);
  SPLITVL_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "varlen_attention: ", name, " must be [B+1]");
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  SPLITVL_CHECK(p[0] == 0, "varlen_attention: ", name, "[0] must be 0, got ", p[0]);
  std::vector<int64_t> lengths(cu.size(0) - 1);
  for (size_t b = 0; b < lengths.size(); ++b) {
    lengths[b] = p[b + 1] - p[b];
    SPLITVL_CHECK(lengths[b] >= 0, "varlen_attention: ", name, " must be non-decreasing");
    SPLITVL_CHECK(lengths[b] <= max_len, "varlen_attention: sequence ", b, " length ", lengths[b],
                " exceeds max_seqlen ", max_len, " given for ", name);
  }
  SPLITVL_CHECK(total < 0 || p[lengths.size()] == total, "varlen_attention: ", name, "[-1]=",
              p[lengths.size()], " != number of tokens ", total);
  return lengths;
}

template <typename T>
KeySource<T> packed_source(const at::Tensor& k, const at::Tensor& v, int64_t start) {
  return {k.const_data_ptr<T>() + start * k.stride(0), v.const_data_ptr<T>() + start * v.stride(0),
          k.stride(0), k.stride(1), v.stride(0), v.stride(1), nullptr, 1};
}

template <typename T>
KeySource<T> paged_source(const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
                          int64_t b) {
  const int64_t tok = kc.size(2) * kc.size(3);
  return {kc.const_data_ptr<T>(), vc.const_data_ptr<T>(), tok, kc.size(3), tok, vc.size(3),
          bt.const_data_ptr<int32_t>() + b * bt.stride(0), kc.size(1)};
}

// attend_group for every (query row r, kv head h) of query [rows, Hq, D] into out, one
// parallel task per pair; keys(r) gives row r's {KeySource<T>, number of keys it sees}.
template <typename T, typename KeysOfRow>
void attend_rows(const at::Tensor& query, at::Tensor& out, int64_t hkv, double scale,
                 const KeysOfRow& keys) {
  const int64_t rows = query.size(0), hq = query.size(1), d = query.size(2), group = hq / hkv;
  const T* q = query.const_data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows * hkv, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(group, d);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / hkv, h = u % hkv;
      const std::pair<KeySource<T>, int64_t> src = keys(r);
      attend_group(src.first, h, src.second, q + r * query.stride(0) + h * group * query.stride(1),
                   query.stride(1), group, d, static_cast<float>(scale),
                   o + (r * hq + h * group) * d, scratch);
    }
  });
}

}  // namespace

void varlen_attention(at::Tensor& out, const at::Tensor& query,
                      const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                      int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
                      const std::optional<at::Tensor>& key_cache,
                      const std::optional<at::Tensor>& value_cache,
                      const std::optional<at::Tensor>& block_tables) {
  constexpr const char* op = "varlen_attention";
  check_query_out(out, query, op);
  const bool paged = block_tables.has_value();
  SPLITVL_CHECK(paged != key.has_value() && key.has_value() == value.has_value() &&
                  paged == key_cache.has_value() && paged == value_cache.has_value(),
              op, ": pass either key and value, or key_cache, value_cache and block_tables");
  if (paged) check_kv_pair(*key_cache, *value_cache, query, 4, "key_cache/value_cache", op);
  else check_kv_pair(*key, *value, query, 3, "key/value", op);
  const std::vector<int64_t> lq = seq_lengths(cu_seqlens_q, query.size(0), max_seqlen_q, "cu_seqlens_q");
  const std::vector<int64_t> lk =
      seq_lengths(cu_seqlens_k, paged ? -1 : key->size(0), max_seqlen_k, "cu_seqlens_k");
  SPLITVL_CHECK(lq.size() == lk.size(), op, ": cu_seqlens_q and cu_seqlens_k differ in batch size");
  if (paged) check_block_tables(*block_tables, *key_cache, lk, op);
  const int64_t tokens = query.size(0), d = query.size(2);
  const int64_t hkv = paged ? key_cache->size(2) : key->size(1);
  if (tokens == 0 || d == 0) return;
  std::vector<int64_t> seq_of(tokens), q_start(lq.size()), k_start(lk.size());
  for (size_t b = 0, t = 0, ks = 0; b < lq.size(); ++b) {
    q_start[b] = static_cast<int64_t>(t);
    k_start[b] = static_cast<int64_t>(ks);
    for (int64_t i = 0; i < lq[b]; ++i) seq_of[t++] = static_cast<int64_t>(b);
    ks += lk[b];
  }
  SPLITVL_DISPATCH_FLOATING(query.scalar_type(), "splitvl_varlen_attention", [&] {
    attend_rows<scalar_t>(query, out, hkv, scale, [&](int64_t t) {
      const int64_t b = seq_of[t], i = t - q_start[b];
      const int64_t n_keys =
          causal ? std::clamp<int64_t>(i + lk[b] - lq[b] + 1, 0, lk[b]) : lk[b];
      const KeySource<scalar_t> src =
          paged ? paged_source<scalar_t>(*key_cache, *value_cache, *block_tables, b)
                : packed_source<scalar_t>(*key, *value, k_start[b]);
      return std::pair{src, n_keys};
    });
  });
}

void paged_attention_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale) {
  constexpr const char* op = "paged_attention_decode";
  check_query_out(out, query, op);
  check_kv_pair(key_cache, value_cache, query, 4, "key_cache/value_cache", op);
  SPLITVL_CHECK_CPU(seq_lens);
  SPLITVL_CHECK_DTYPE(seq_lens, at::kInt);
  const int64_t batch = query.size(0), d = query.size(2);
  SPLITVL_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == batch, op, ": seq_lens ",
              seq_lens.sizes(), " must be [B=", batch, "]");
  const at::Tensor lens_t = seq_lens.contiguous();
  std::vector<int64_t> lens(lens_t.const_data_ptr<int32_t>(), lens_t.const_data_ptr<int32_t>() + batch);
  for (int64_t b = 0; b < batch; ++b)
    SPLITVL_CHECK(lens[b] >= 0, op, ": seq_lens[", b, "]=", lens[b], " is negative");
  check_block_tables(block_tables, key_cache, lens, op);
  const int64_t hkv = key_cache.size(2);
  if (batch == 0 || d == 0) return;
  SPLITVL_DISPATCH_FLOATING(query.scalar_type(), "splitvl_paged_attention_decode", [&] {
    attend_rows<scalar_t>(query, out, hkv, scale, [&](int64_t b) {
      return std::pair{paged_source<scalar_t>(key_cache, value_cache, block_tables, b), lens[b]};
    });
  });
}

}  // namespace splitvl::cpu
