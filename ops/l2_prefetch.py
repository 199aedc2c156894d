"""The process's L2-prefetch switch of `moe_decode_block`.

On (`SPLITVL_L2_PREFETCH=1` starts a process with it on; off by default), the block asks L2 for
its down rows while its gate_up rows stream (those then read evict-first), so its last phase
reads L2 instead of starting a second DRAM stream after its grid barrier; off, it reads each
weight when it needs it. Results are the same either way. Kernels launched after a change use
the new setting, so a CUDA graph keeps the one it was captured with: a bench times both by
capturing once per setting (`bench.moe --l2-prefetch on,off`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from ops._launch_switch import LaunchSwitch

_SWITCH = LaunchSwitch("l2_prefetch")


def set_l2_prefetch(enabled: bool) -> None:
    """Turn the MoE block's L2 prefetch on or off for later launches (no effect without the extension)."""
    _SWITCH.set(enabled)


def l2_prefetch_enabled() -> bool:
    """Whether later MoE block launches prefetch their down rows (False without the extension)."""
    return _SWITCH.enabled()


def l2_prefetch(enabled: bool) -> AbstractContextManager[None]:
    """Launch with the L2 prefetch `enabled` inside the block; the previous setting is restored after it."""
    return _SWITCH.scoped(enabled)
