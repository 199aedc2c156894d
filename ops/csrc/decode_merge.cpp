// The paged decode merge switch (decode_merge.h); in the C++ sources so Python can always set it.
#include "decode_merge.h"

#include <torch/library.h>

#include "launch_switch.h"

namespace splitvl {
namespace {

LaunchSwitch& decode_fused_merge_switch() {
  // Off until its GPU tests have passed on a device (gpu_i18.sh b1-test); =1 turns it on.
  static LaunchSwitch flag{"SPLITVL_DECODE_FUSED_MERGE", false};
  return flag;
}

}  // namespace

bool decode_fused_merge_enabled() { return decode_fused_merge_switch().enabled(); }

void set_decode_fused_merge_enabled(bool enabled) { decode_fused_merge_switch().set(enabled); }

}  // namespace splitvl

TORCH_LIBRARY_FRAGMENT(splitvl_launch, m) {
  m.def("set_decode_fused_merge(bool enabled) -> ()",
        [](bool enabled) { splitvl::set_decode_fused_merge_enabled(enabled); });
  m.def("decode_fused_merge_enabled() -> bool", [] { return splitvl::decode_fused_merge_enabled(); });
}
