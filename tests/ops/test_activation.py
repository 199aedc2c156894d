"""silu_and_mul / gelu_tanh / sigmoid_gate_mul: kernels vs reference, reference vs torch's own activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops import reference
from tests.ops.common import raises, DEVICE_DTYPES, DEVICES, assert_close


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(0, 64), (1, 16), (7, 2 * 769), (3, 2 * 5125), (2, 3, 256)])
def test_silu_and_mul(kernels, device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device) * 4
    out = kernels.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, reference.silu_and_mul(x), dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(0, 64), (5,), (7, 769), (3, 5125), (2, 3, 256)])
def test_gelu_tanh(kernels, device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device) * 4
    assert_close(kernels.gelu_tanh(x), reference.gelu_tanh(x), dtype)


def _gated_heads(t: int, h: int, d: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [t, h, d] contiguous (an attention output) and gate [t, h, d] as Qwen3.5 has it: the second
    half of each head's (query, gate) pair in a fused qkv row, so two outer strides and no row stride."""
    x = torch.randn(t, h, d, dtype=dtype, device=device) * 3
    qkv = torch.randn(t, h * 2 * d + 2 * d, dtype=dtype, device=device) * 4
    gate = qkv[:, : h * 2 * d].view(t, h, 2 * d)[..., d:]
    return x, gate


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("t,h,d", [(0, 2, 64), (1, 8, 256), (7, 3, 769), (5, 2, 40), (3, 1, 5)])
def test_sigmoid_gate_mul(kernels, device, dtype, t, h, d):
    x, gate = _gated_heads(t, h, d, dtype, device)
    out = kernels.sigmoid_gate_mul(x, gate)
    assert out.shape == x.shape and out.is_contiguous() and out.dtype == dtype
    assert_close(out, reference.sigmoid_gate_mul(x, gate), dtype)
    rows, gate_rows = x.flatten(0, 1), torch.randn(t * h, d + 3, dtype=dtype, device=device)[:, 1 : d + 1]
    assert_close(kernels.sigmoid_gate_mul(rows, gate_rows), reference.sigmoid_gate_mul(rows, gate_rows), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_activations_on_strided_rows(kernels, device):
    """Row-strided views (a column block of a wider projection output) are read in place."""
    buf = torch.randn(6, 3000, device=device)
    x = buf[:, 100 : 100 + 2 * 769]
    assert not x.is_contiguous()
    assert_close(kernels.silu_and_mul(x), reference.silu_and_mul(x), torch.float32)
    assert_close(kernels.gelu_tanh(x), reference.gelu_tanh(x), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_activation_rejects_bad_input(kernels, device):
    with raises(device, "even"):
        torch.ops.splitvl.silu_and_mul(torch.empty(2, 3, device=device), torch.randn(2, 7, device=device))
    with raises(device, "must match"):
        torch.ops.splitvl.gelu_tanh(torch.empty(2, 3, device=device), torch.randn(2, 4, device=device))
    x = torch.randn(2, 4, device=device)
    with raises(device, "gate"):
        torch.ops.splitvl.sigmoid_gate_mul(torch.empty_like(x), x, torch.randn(2, 5, device=device))
    with raises(device, "gate"):
        torch.ops.splitvl.sigmoid_gate_mul(torch.empty_like(x), x, x.double())
    with raises(device, "unit stride"):
        torch.ops.splitvl.sigmoid_gate_mul(torch.empty_like(x), x, torch.randn(4, 2, device=device).t())


@pytest.mark.parametrize("device", DEVICES)
def test_activation_opcheck(kernels, device):
    x = torch.randn(4, 3, 64, device=device)
    torch.library.opcheck(torch.ops.splitvl.silu_and_mul.default, (torch.empty(4, 3, 32, device=device), x))
    torch.library.opcheck(torch.ops.splitvl.gelu_tanh.default, (torch.empty_like(x), x))
    y, gate = _gated_heads(4, 3, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.splitvl.sigmoid_gate_mul.default, (torch.empty_like(y), y, gate))


def test_reference_activations_match_independent_math():
    x = torch.randn(5, 64, dtype=torch.float64)
    gate, up = x[:, :32], x[:, 32:]
    torch.testing.assert_close(reference.silu_and_mul(x), gate * torch.sigmoid(gate) * up)
    tanh_form = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(reference.gelu_tanh(x), tanh_form)
    assert not torch.allclose(reference.gelu_tanh(x), F.gelu(x))  # really the tanh form


def test_reference_sigmoid_gate_matches_transformers_math():
    """transformers' Qwen3.5 attention: `attn_output * torch.sigmoid(gate)` in the model dtype."""
    x, gate = torch.randn(2, 6, 3, 32, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(reference.sigmoid_gate_mul(x, gate), x * torch.sigmoid(gate), rtol=0, atol=0)
    xb, gb = x.bfloat16(), (gate * 4).bfloat16()
    torch.testing.assert_close(reference.sigmoid_gate_mul(xb, gb), xb * torch.sigmoid(gb), rtol=0, atol=0)
