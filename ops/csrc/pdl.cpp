// The programmatic-dependent-launch switch (pdl.h). It lives in the C++ sources, built with or
// without CUDA, so Python can always set it; CPU kernels ignore it. Registered in its own
// namespace: it is a launch setting, not an op with a reference (torch.ops.splitvl lists ops only).
#include "pdl.h"

#include <torch/library.h>

#include "launch_switch.h"

namespace splitvl {
namespace {

// On unless SPLITVL_PDL=0 (a bisecting switch: the results are the same either way, which
// tests/ops/test_pdl.py and tests/engine/test_gpu_graphs.py check on the GPU).
LaunchSwitch& pdl_switch() {
  static LaunchSwitch flag{"SPLITVL_PDL"};
  return flag;
}

}  // namespace

bool pdl_enabled() { return pdl_switch().enabled(); }

void set_pdl_enabled(bool enabled) { pdl_switch().set(enabled); }

}  // namespace splitvl

TORCH_LIBRARY(splitvl_launch, m) {
  m.def("set_pdl(bool enabled) -> ()", [](bool enabled) { splitvl::set_pdl_enabled(enabled); });
  m.def("pdl_enabled() -> bool", [] { return splitvl::pdl_enabled(); });
}
