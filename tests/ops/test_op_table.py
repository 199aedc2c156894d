"""The op pattern holds for every op: schema, CPU (and CUDA) kernel, fake, wrapper and a
reference of the same signature; `OpTable` gives a wrapper its reference's signature and docstring,
and binds the reference in its place without the extension."""

from __future__ import annotations

import inspect
import pydoc
import types

import pytest
import torch

import ops
from ops import build, reference, reference_linear_attn
from ops._extension import ExtensionState, OpTable
from tests.ops.common import GPU


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
def test_wrapper_shows_its_references_signature_and_docstring(bound):
    # Without the extension the reference replaces the wrapper, so callers must not see a difference.
    signature = inspect.signature(bound.reference)
    public = getattr(ops, bound.name)
    for fn in (bound.wrapper, public):
        assert inspect.signature(fn) == signature
        assert fn.__doc__ == bound.reference.__doc__ and "Shapes" in fn.__doc__
        assert fn.__name__ == bound.name
    page = pydoc.render_doc(public, renderer=pydoc.plaintext)
    assert f"{bound.name}{signature}" in page
    assert all(line.strip() in page for line in inspect.getdoc(bound.reference).splitlines())


def _references(fn) -> types.ModuleType:
    references = types.ModuleType("references")
    setattr(references, fn.__name__, fn)
    return references


def test_without_the_extension_a_wrapper_is_its_reference():
    def scale(x: float, by: float = 2.0) -> float:
        return x * by

    def scale_wrapper(x, by):
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


def test_a_wrapper_gets_the_references_defaults_and_must_not_restate_them():
    def scale(x: float, by: float = 2.0, *, offset: float = 0.0) -> float:
        """x * by + offset."""
        return x * by + offset

    table = OpTable(ExtensionState(False, "test"))

    def wrapper(x, by, *, offset):
        return -(x * by + offset)

    wrapper.__name__ = "scale"
    table.op(_references(scale))(wrapper)
    assert inspect.signature(wrapper) == inspect.signature(scale) and wrapper.__doc__ == scale.__doc__
    assert wrapper(3.0) == -6.0 and wrapper(3.0, 1.0, offset=1.0) == -4.0

    def renamed(x, factor, *, offset):
        raise AssertionError

    def with_default(x, by=2.0, *, offset):
        raise AssertionError

    def annotated(x: float, by, *, offset):
        raise AssertionError

    def documented(x, by, *, offset):
        """Scales x."""

    def not_keyword(x, by, offset):
        raise AssertionError

    for bad, pattern in [(renamed, "takes"), (with_default, "restates defaults"),
                         (annotated, "restates annotations"), (documented, "restates a docstring"),
                         (not_keyword, "takes")]:
        bad.__name__ = "scale"
        with pytest.raises(TypeError, match=pattern):
            OpTable(ExtensionState(False, "test")).op(_references(scale))(bad)


def test_wrappers_compile_with_defaults_left_out(kernels):
    # torch.compile binds the omitted arguments from the defaults the wrapper took from its
    # reference, and traces the ops through their fake kernels.
    dim, width, heads, head_size = 48, 4, 2, 16
    x = torch.randn(3, dim)
    weight, norm_weight = torch.randn(dim, width), torch.rand(dim) + 0.5
    slots = torch.tensor([2, 0, 1], dtype=torch.int32)
    positions = torch.tensor([0, 5, 9])
    cos_sin = torch.randn(16, head_size)

    def step(x, conv_states, query):
        y = kernels.causal_conv1d_update(x, weight, None, conv_states, slots)
        kernels.rotary_embedding(positions, query, None, head_size, cos_sin)
        return kernels.rms_norm(y, norm_weight, 1e-6), query

    def expected_step(x, conv_states, query):
        y = reference_linear_attn.causal_conv1d_update(x, weight, None, conv_states, slots)
        reference.rotary_embedding(positions, query, None, head_size, cos_sin)
        return reference.rms_norm(y, norm_weight, 1e-6), query

    states, query = torch.randn(3, dim, width - 1), torch.randn(3, heads * head_size)
    want_states, want_query = states.clone(), query.clone()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x, states, query)
    want = expected_step(x, want_states, want_query)
    for actual, expected in [*zip(got, want), (states, want_states)]:
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)
