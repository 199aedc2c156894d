// The process's switch of the Hopper (sm_90a, wgmma) attention kernel (host side; the kernel is
// cuda/varlen_attention_sm90.cu). Read once from SPLITVL_ATTN_SM90 (1 enables; default off: slower
// than mma.sync so far), set at run time through torch.ops.splitvl_launch.set_attention_sm90
// (ops.set_attention_sm90).
// Off, varlen_attention runs the mma.sync kernel for every call (a bisecting switch: both
// kernels compute the same attention, to rounding).
#pragma once

namespace splitvl {

bool attention_sm90_enabled();
void set_attention_sm90_enabled(bool enabled);

}  // namespace splitvl
