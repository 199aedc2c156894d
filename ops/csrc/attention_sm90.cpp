// The sm_90a attention switch (attention_sm90.h); in the C++ sources so Python can always set it.
#include "attention_sm90.h"

#include <torch/library.h>

#include "launch_switch.h"

namespace splitvl {
namespace {

LaunchSwitch& attention_sm90_switch() {
  static LaunchSwitch flag{"SPLITVL_ATTN_SM90", /*default_on=*/false};  // slower than mma.sync so far
  return flag;
}

}  // namespace

bool attention_sm90_enabled() { return attention_sm90_switch().enabled(); }

void set_attention_sm90_enabled(bool enabled) { attention_sm90_switch().set(enabled); }

}  // namespace splitvl

TORCH_LIBRARY_FRAGMENT(splitvl_launch, m) {
  m.def("set_attention_sm90(bool enabled) -> ()",
        [](bool enabled) { splitvl::set_attention_sm90_enabled(enabled); });
  m.def("attention_sm90_enabled() -> bool", [] { return splitvl::attention_sm90_enabled(); });
}
