// The programmatic-dependent-launch switch (pdl.h). It lives in the C++ sources, built with or
// without CUDA, so Python can always set it; CPU kernels ignore it. Registered in its own
// namespace: it is a launch setting, not an op with a reference (torch.ops.splitvl lists ops only).
#include "pdl.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace splitvl {
namespace {

// On unless SPLITVL_PDL=0 (a bisecting switch: the results are the same either way, which
// tests/ops/test_pdl.py and tests/engine/test_gpu_graphs.py check on the GPU).
bool env_default() {
  const char* value = std::getenv("SPLITVL_PDL");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// A process-wide launch setting like cudnn.benchmark: every stream and thread launches the
// same way, and reading it is one relaxed load per launch.
std::atomic<bool>& pdl_flag() {
  static std::atomic<bool> flag{env_default()};
  return flag;
}

}  // namespace

bool pdl_enabled() { return pdl_flag().load(std::memory_order_relaxed); }

void set_pdl_enabled(bool enabled) { pdl_flag().store(enabled, std::memory_order_relaxed); }

}  // namespace splitvl

TORCH_LIBRARY(splitvl_launch, m) {
  m.def("set_pdl(bool enabled) -> ()", [](bool enabled) { splitvl::set_pdl_enabled(enabled); });
  m.def("pdl_enabled() -> bool", [] { return splitvl::pdl_enabled(); });
}
