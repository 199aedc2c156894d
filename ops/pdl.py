"""The process's programmatic-dependent-launch (PDL) switch of the CUDA kernels.

With PDL on (the default; `SPLITVL_PDL=0` starts a process with it off), the decode-path
kernels launch with Hopper's programmatic stream serialization: a kernel's blocks start
while the kernel before it drains and wait in `griddepcontrol.wait` before touching
anything that kernel may write (ops/csrc/cuda/pdl.cuh states the rule). Results are the
same either way. Kernels launched after a change use the new setting, so a CUDA graph keeps
the one it was captured with: a bench times both by capturing once per setting.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from ops._launch_switch import LaunchSwitch

_SWITCH = LaunchSwitch("pdl")


def set_programmatic_launch(enabled: bool) -> None:
    """Turn PDL on or off for this process's later launches (no effect without the extension)."""
    _SWITCH.set(enabled)


def programmatic_launch_enabled() -> bool:
    """Whether later launches use PDL (False without the extension; an older GPU ignores it)."""
    return _SWITCH.enabled()


def programmatic_launch(enabled: bool) -> AbstractContextManager[None]:
    """Launch with PDL `enabled` inside the block; the previous setting is restored after it."""
    return _SWITCH.scoped(enabled)
