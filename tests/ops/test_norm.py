"""rms_norm / fused_add_rms_norm: kernels vs reference, reference vs transformers."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.common import raises, DEVICE_DTYPES, DEVICES, assert_close

EPS = 1e-6


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(0, 64), (1, 8), (7, 769), (3, 5125), (2, 3, 128)])
def test_rms_norm_matches_reference(kernels, device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    out = kernels.rms_norm(x, w, EPS)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, reference.rms_norm(x, w, EPS), dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_rms_norm_qk_heads_of_fused_qkv(kernels, device, dtype):
    """Per-head q/k norm over head_dim of strided [T, H, D] views of the qkv output."""
    tokens, hq, hkv, d = 5, 4, 2, 128
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    before = qkv.clone()
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    assert not q.is_contiguous()
    w = torch.randn(d, dtype=dtype, device=device)
    for x in (q, k, q.transpose(0, 1)):  # transpose: outer dims that do not collapse
        assert_close(kernels.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), dtype)
    torch.testing.assert_close(qkv, before, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(0, 64), (7, 769), (3, 5125)])
def test_fused_add_rms_norm_matches_reference(kernels, device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    x_ref, res_ref = x.clone(), residual.clone()
    reference.fused_add_rms_norm(x_ref, res_ref, w, EPS)
    kernels.fused_add_rms_norm(x, residual, w, EPS)
    assert_close(residual, res_ref, dtype)
    assert_close(x, x_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_add_rms_norm_strided_input(kernels, device):
    """x may be a column slice of a wider buffer; only that slice is written."""
    buf = torch.randn(6, 200, device=device)
    x, residual = buf[:, 10:138], torch.randn(6, 128, device=device)
    w = torch.randn(128, device=device)
    outside = torch.cat([buf[:, :10], buf[:, 138:]], dim=1).clone()
    x_ref, res_ref = x.clone(), residual.clone()
    reference.fused_add_rms_norm(x_ref, res_ref, w, EPS)
    kernels.fused_add_rms_norm(x, residual, w, EPS)
    assert_close(x, x_ref, torch.float32)
    assert_close(residual, res_ref, torch.float32)
    torch.testing.assert_close(torch.cat([buf[:, :10], buf[:, 138:]], dim=1), outside)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_rejects_bad_input(kernels, device):
    x = torch.randn(4, 64, device=device)
    with raises(device, "weight"):
        kernels.rms_norm(x, torch.ones(32, device=device), EPS)
    with raises(device, "dtype"):
        kernels.rms_norm(x, torch.ones(64, device=device, dtype=torch.bfloat16), EPS)
    with raises(device, "stride"):
        kernels.rms_norm(torch.randn(64, 4, device=device).t(), torch.ones(4, device=device), EPS)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_opcheck(kernels, device):
    x = torch.randn(3, 5, 64, device=device)
    w = torch.randn(64, device=device)
    torch.library.opcheck(torch.ops.splitvl.rms_norm.default, (torch.empty_like(x), x, w, EPS))
    res = torch.randn_like(x)
    torch.library.opcheck(torch.ops.splitvl.fused_add_rms_norm.default, (x.clone(), res, w, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers_qwen3_rmsnorm(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
        x = torch.randn(5, 3, 96, dtype=dtype)
        torch.testing.assert_close(reference.rms_norm(x, norm.weight, EPS), norm(x), rtol=0, atol=0)
