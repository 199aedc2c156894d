"""One process-wide launch switch of the C++ sources (ops/csrc/launch_switch.h), seen from Python.

Each switch is read once from its environment variable when the extension loads, and set at run
time through `torch.ops.splitvl_launch.set_<name>`. Kernels launched after a change use the new
value, so a CUDA graph keeps the one it was captured with: benches time both settings by
capturing once per setting. Without the extension a switch reads False and setting it does
nothing (the references have no launches to switch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ops._extension import extension_available


class LaunchSwitch:
    """`torch.ops.splitvl_launch.{set_<name>, <name>_enabled}` as `set`, `enabled` and `scoped`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def set(self, enabled: bool) -> None:
        """Turn the switch on or off for later launches (no effect without the extension)."""
        if extension_available():
            getattr(torch.ops.splitvl_launch, f"set_{self.name}")(enabled)

    def enabled(self) -> bool:
        """Whether later launches take the switched path (False without the extension)."""
        return extension_available() and bool(getattr(torch.ops.splitvl_launch, f"{self.name}_enabled")())

    @contextmanager
    def scoped(self, enabled: bool) -> Iterator[None]:
        """The switch set to `enabled` inside the block; the previous setting is restored after it."""
        previous = self.enabled()
        self.set(enabled)
        try:
            yield
        finally:
            self.set(previous)
