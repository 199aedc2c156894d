// The process's switch of paged_attention_decode's fused partition merge (host side; the kernels
// are cuda/paged_attention.cu and cuda/paged_decode_merge.cuh). Read once from
// SPLITVL_DECODE_FUSED_MERGE (1 enables; default off: slower at batch 1), set at run time through
// torch.ops.splitvl_launch.set_decode_fused_merge (ops.set_decode_fused_merge).
// On, the last decode CTA of a (sequence, head group) merges its context partitions (one launch);
// off, paged_decode_merge_kernel does, as a second launch (a bisecting switch: both compute the
// same attention, to rounding).
#pragma once

namespace splitvl {

bool decode_fused_merge_enabled();
void set_decode_fused_merge_enabled(bool enabled);

}  // namespace splitvl
