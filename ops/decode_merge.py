"""The process's switch of `paged_attention_decode`'s fused partition merge.

When a sequence's context is split into partitions (always at batch 1: the partitions fill the
GPU), their partial results must be merged. With the switch on (`SPLITVL_DECODE_FUSED_MERGE=1`
starts a process with it on; off by default: slower at batch 1, BENCHMARKS.md 17.2) the last
decode CTA of each (sequence, head group) to finish merges them, so the op is one launch; off, a
second kernel merges them. Both compute the same attention to rounding. Kernels launched after a change use
the new setting, so a CUDA graph keeps the one it was captured with: a bench times both by
capturing once per setting.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from ops._launch_switch import LaunchSwitch

_SWITCH = LaunchSwitch("decode_fused_merge")


def set_decode_fused_merge(enabled: bool) -> None:
    """Turn the fused merge on or off for later calls (no effect without the extension)."""
    _SWITCH.set(enabled)


def decode_fused_merge_enabled() -> bool:
    """Whether later calls merge in the decode kernel (False without the extension)."""
    return _SWITCH.enabled()


def decode_fused_merge(enabled: bool) -> AbstractContextManager[None]:
    """Run paged decode with the fused merge `enabled` inside the block; the previous setting is restored after it."""
    return _SWITCH.scoped(enabled)
