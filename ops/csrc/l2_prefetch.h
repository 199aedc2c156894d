// The process's L2-prefetch switch (host side; the kernels are cuda/prefetch_l2.cu and the
// down-row prefetch in cuda/moe_decode_block.cu). Read once from SPLITVL_L2_PREFETCH (1 enables;
// default off until its GPU tests pass), set at run time through
// torch.ops.splitvl_launch.set_l2_prefetch (ops.set_l2_prefetch). On, prefetch_l2 asks the L2 for
// a weight ahead of the kernel that reads it, and moe_decode_block prefetches its down rows while
// its gate_up rows stream; off, prefetch_l2 launches nothing. A bisecting switch: prefetches change
// timing, never results.
#pragma once

namespace splitvl {

bool l2_prefetch_enabled();
void set_l2_prefetch_enabled(bool enabled);

}  // namespace splitvl
