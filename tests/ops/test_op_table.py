"""The op pattern holds for every op: schema, CPU (and CUDA) kernel, fake, wrapper and a
reference of the same signature; `OpTable` binds a wrapper to its reference without the extension."""

from __future__ import annotations

import inspect
import types

import pytest

import ops
from ops import build
from ops._extension import ExtensionState, OpTable
from tests.ops.common import GPU


def _parameters(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_every_schema_has_one_wrapper_and_every_wrapper_a_cpu_kernel_and_fake(kernels):
    registered = build.registered_ops()
    declared = [bound.name for bound in kernels.OPS]
    assert len(declared) == len(set(declared))
    assert set(registered) == set(declared)
    for name in declared:
        assert {"CPU", "Meta"} <= set(registered[name]), (name, registered[name])


@GPU
def test_every_op_has_a_cuda_kernel(kernels):
    registered = build.registered_ops()
    missing = [bound.name for bound in kernels.OPS if "CUDA" not in registered[bound.name]]
    assert not missing, missing


@pytest.mark.parametrize("bound", ops.OPS, ids=lambda bound: bound.name)
def test_wrapper_and_reference_take_the_same_arguments(bound):
    # Without the extension the reference replaces the wrapper, so callers must not see a difference.
    assert _parameters(bound.wrapper) == _parameters(bound.reference)
    assert bound.wrapper.__name__ == bound.reference.__name__ == bound.name


def test_without_the_extension_a_wrapper_is_its_reference():
    def scale(x: float, by: float = 2.0) -> float:
        return x * by

    def scale_wrapper(x: float, by: float = 2.0) -> float:
        raise AssertionError("the extension is not available: the reference must run")

    scale_wrapper.__name__ = "scale"
    references = types.ModuleType("references")
    references.scale = scale
    table = OpTable(ExtensionState(False, "test"))
    bound = table.op(references)(scale_wrapper)
    assert bound is scale and bound(3.0) == 6.0
    assert [(b.name, b.wrapper, b.reference) for b in table.ops()] == [("scale", scale_wrapper, scale)]
    with pytest.raises(ValueError, match="declared twice"):
        table.op(references)(scale_wrapper)
