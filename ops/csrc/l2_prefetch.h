// The process's L2-prefetch switch of moe_decode_block (host side; the kernel is
// cuda/moe_decode_block.cu). Read once from SPLITVL_L2_PREFETCH (1 enables; default off), set at
// run time through torch.ops.splitvl_launch.set_l2_prefetch (ops.set_l2_prefetch). On, the block
// bulk-prefetches its down rows into L2 while its gate_up rows stream (those read evict-first);
// off, it reads each weight when it needs it. A bisecting switch: prefetches change timing, never
// results.
#pragma once

namespace splitvl {

bool l2_prefetch_enabled();
void set_l2_prefetch_enabled(bool enabled);

}  // namespace splitvl
