// The paged decode merge switch (decode_merge.h); in the C++ sources so Python can always set it.
#include "decode_merge.h"

#include <torch/library.h>

#include "launch_switch.h"

namespace splitvl {
namespace {

LaunchSwitch& decode_fused_merge_switch() {
  static LaunchSwitch flag{"SPLITVL_DECODE_FUSED_MERGE"};
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
