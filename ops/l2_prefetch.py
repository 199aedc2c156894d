"""The process's L2-prefetch switch of the decode kernels.

On (`SPLITVL_L2_PREFETCH=1` starts a process with it on; off by default until its GPU tests and
bench have run on a device), `ops.prefetch_l2` asks the L2 cache for a weight while the small
kernels before its GEMV leave the memory bus idle, and `moe_decode_block` prefetches its down
rows while its gate_up rows stream (its gate_up loads then ask L2 to evict them first). Off,
`prefetch_l2` launches nothing and the MoE block reads each weight when it needs it. Results
are the same either way. Kernels launched after a change use the new setting, so a CUDA graph
keeps the one it was captured with: a bench times both by capturing once per setting
(`bench.moe --l2-prefetch on,off`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from ops._launch_switch import LaunchSwitch

_SWITCH = LaunchSwitch("l2_prefetch")


def set_l2_prefetch(enabled: bool) -> None:
    """Turn the L2 prefetches on or off for later launches (no effect without the extension)."""
    _SWITCH.set(enabled)


def l2_prefetch_enabled() -> bool:
    """Whether later launches prefetch into L2 (False without the extension)."""
    return _SWITCH.enabled()


def l2_prefetch(enabled: bool) -> AbstractContextManager[None]:
    """Launch with the L2 prefetches `enabled` inside the block; the previous setting is restored after it."""
    return _SWITCH.scoped(enabled)
