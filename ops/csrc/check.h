// SPLITVL_CHECK: TORCH_CHECK with an snprintf-built message, used by every
// splitvl kernel (CPU and CUDA) instead of TORCH_CHECK's variadic form.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

namespace splitvl {

namespace detail {

// Error messages are formatted here with snprintf and handed to TORCH_CHECK as
// one C string, so no std::ostringstream (c10::str) code is instantiated in
// these objects. On the GPU machine (torch 2.11, nvcc -ccbin /opt/gcc) any
// extension's TORCH_CHECK with stream-built arguments segfaulted when it fired
// (a two-line probe extension too), while C-string messages raise normally.
struct MsgBuf {
  char text[768];
  size_t len = 0;
};

inline void put_fmt(MsgBuf& m, const char* fmt, ...) {
  if (m.len + 1 >= sizeof(m.text)) return;
  va_list args;
  va_start(args, fmt);
  const int n = std::vsnprintf(m.text + m.len, sizeof(m.text) - m.len, fmt, args);
  va_end(args);
  if (n > 0) m.len = std::min(sizeof(m.text) - 1, m.len + static_cast<size_t>(n));
}

inline void put(MsgBuf& m, const char* s) { put_fmt(m, "%s", s); }
inline void put(MsgBuf& m, const std::string& s) { put(m, s.c_str()); }
inline void put(MsgBuf& m, double v) { put_fmt(m, "%g", v); }
inline void put(MsgBuf& m, c10::ScalarType t) { put(m, c10::toString(t)); }
inline void put(MsgBuf& m, c10::IntArrayRef a) {
  put(m, "[");
  for (size_t i = 0; i < a.size(); ++i) put_fmt(m, i ? ", %lld" : "%lld", static_cast<long long>(a[i]));
  put(m, "]");
}
inline void put(MsgBuf& m, const std::vector<int64_t>& v) { put(m, c10::IntArrayRef(v)); }
inline void put(MsgBuf& m, const c10::Device& d) {
  put(m, d.is_cuda() ? "cuda" : d.is_cpu() ? "cpu" : "other");
  if (d.has_index()) put_fmt(m, ":%d", static_cast<int>(d.index()));
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void put(MsgBuf& m, T v) {
  put_fmt(m, "%lld", static_cast<long long>(v));
}

template <typename... Args>
const char* format(MsgBuf& m, const Args&... args) {
  m.text[0] = '\0';
  (put(m, args), ...);
  return m.text;
}

}  // namespace detail

// TORCH_CHECK with a snprintf-built message (see detail::MsgBuf for why).
#define SPLITVL_CHECK(cond, ...)                                                   \
  do {                                                                             \
    if (C10_UNLIKELY(!(cond))) {                                                   \
      ::splitvl::detail::MsgBuf splitvl_msg_;                                      \
      const char* splitvl_text_ = ::splitvl::detail::format(splitvl_msg_, __VA_ARGS__); \
      TORCH_CHECK(false, splitvl_text_);                                           \
    }                                                                              \
  } while (0)

}  // namespace splitvl
