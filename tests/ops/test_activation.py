"""silu_and_mul / gelu_tanh: kernels vs reference, reference vs torch's own activations."""

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


@pytest.mark.parametrize("device", DEVICES)
def test_activation_opcheck(kernels, device):
    x = torch.randn(4, 3, 64, device=device)
    torch.library.opcheck(torch.ops.splitvl.silu_and_mul.default, (torch.empty(4, 3, 32, device=device), x))
    torch.library.opcheck(torch.ops.splitvl.gelu_tanh.default, (torch.empty_like(x), x))


def test_reference_activations_match_independent_math():
    x = torch.randn(5, 64, dtype=torch.float64)
    gate, up = x[:, :32], x[:, 32:]
    torch.testing.assert_close(reference.silu_and_mul(x), gate * torch.sigmoid(gate) * up)
    tanh_form = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(reference.gelu_tanh(x), tanh_form)
    assert not torch.allclose(reference.gelu_tanh(x), F.gelu(x))  # really the tanh form
