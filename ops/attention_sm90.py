"""The process's switch of the Hopper (sm_90a, wgmma) attention kernel.

`varlen_attention` runs ops/csrc/cuda/varlen_attention_sm90.cu for the calls it takes
(bidirectional, keys packed, fp16/bf16, head_dim 64/72/80, on a compute capability 9.0 GPU with
the sm_90a build) while the switch is on, and its mma.sync kernel otherwise. The switch is off by
default: on an H200 the kernel is correct but 1.33x slower than the mma.sync one on the vision
tower (BENCHMARKS.md 13.2); `SPLITVL_ATTN_SM90=1` starts a process with it on. Both compute the
same attention to rounding; benches time both. Kernels launched after a change use the new
setting, so a CUDA graph keeps the one it was captured with.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from ops._extension import extension_available
from ops._launch_switch import LaunchSwitch


def attention_sm90_available(device: torch.device | int | None = None) -> bool:
    """Whether `device` (default: the current CUDA device) can run the wgmma kernel: a CUDA build
    of the extension with its sm_90a body, on compute capability 9.0. The switch is not consulted."""
    if not (extension_available() and torch.cuda.is_available()):
        return False
    if not hasattr(torch.ops.splitvl_launch, "attention_sm90_available"):  # a CPU-only build
        return False
    if isinstance(device, torch.device):
        device = device.index
    index = torch.cuda.current_device() if device is None else device
    return bool(torch.ops.splitvl_launch.attention_sm90_available(index))


_SWITCH = LaunchSwitch("attention_sm90")


def set_attention_sm90(enabled: bool) -> None:
    """Turn the wgmma attention kernel on or off for later calls (no effect without the extension)."""
    _SWITCH.set(enabled)


def attention_sm90_enabled() -> bool:
    """Whether later calls may take the wgmma kernel (False without the extension)."""
    return _SWITCH.enabled()


def attention_sm90(enabled: bool) -> AbstractContextManager[None]:
    """Run attention with the wgmma kernel `enabled` inside the block; the previous setting is restored after it."""
    return _SWITCH.scoped(enabled)
