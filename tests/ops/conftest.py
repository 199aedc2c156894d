"""Fixtures of the op tests: the compiled extension, devices and dtypes."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def kernels():
    """The ops package with its compiled kernels; fails (not skips) when the build is broken."""
    import ops

    assert ops.extension_available(), f"splitvl extension unavailable: {ops.fallback_reason()}"
    return ops


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
