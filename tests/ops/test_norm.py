"""rms_norm / fused_add_rms_norm: kernels vs reference, reference vs transformers."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.common import raises, DEVICE_DTYPES, DEVICES, assert_close

EPS = 1e-6


def _with_weight(param, weight_dtype: torch.dtype, suffix: str):
    device, dtype = param.values
    return pytest.param(device, dtype, weight_dtype, marks=param.marks, id=param.id + suffix)


# (device, x dtype, weight dtype): the weight in x's dtype (Qwen3), and an fp32 weight with
# a half-precision x (Qwen3.5's `1 + w` norms), which rounds once after the fp32 scale.
_HALF = [p for p in DEVICE_DTYPES if p.values[1] != torch.float32] + [
    pytest.param("cpu", torch.float16, id="cpu-fp16")
]
NORM_DTYPES = (
    [_with_weight(p, p.values[1], "") for p in DEVICE_DTYPES]
    + [_with_weight(pytest.param("cpu", torch.float16, id="cpu-fp16"), torch.float16, "")]
    + [_with_weight(p, torch.float32, "-w32") for p in _HALF]
)


@pytest.mark.parametrize("device,dtype,wdtype", NORM_DTYPES)
@pytest.mark.parametrize("shape", [(0, 64), (1, 8), (7, 769), (3, 5125), (2, 3, 128), (4, 1024), (2, 2048), (2049, 64)])
def test_rms_norm_matches_reference(kernels, device, dtype, wdtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    w = torch.randn(shape[-1], dtype=wdtype, device=device)
    out = kernels.rms_norm(x, w, EPS)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, reference.rms_norm(x, w, EPS), dtype)


@pytest.mark.parametrize("device,dtype,wdtype", NORM_DTYPES)
@pytest.mark.parametrize("d", [128, 256])
def test_rms_norm_qk_heads_of_fused_qkv(kernels, device, dtype, wdtype, d):
    """Per-head q/k norm over head_dim of strided [T, H, D] views of the qkv output."""
    tokens, hq, hkv = 5, 4, 2
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    before = qkv.clone()
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    assert not q.is_contiguous()
    w = torch.randn(d, dtype=wdtype, device=device)
    for x in (q, k, q.transpose(0, 1)):  # transpose: outer dims that do not collapse
        assert_close(kernels.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), dtype)
    torch.testing.assert_close(qkv, before, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype,wdtype", NORM_DTYPES)
@pytest.mark.parametrize("shape", [(0, 64), (7, 769), (3, 5125), (1, 1024), (9, 2048)])
def test_fused_add_rms_norm_matches_reference(kernels, device, dtype, wdtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=wdtype, device=device)
    x_ref, res_ref = x.clone(), residual.clone()
    reference.fused_add_rms_norm(x_ref, res_ref, w, EPS)
    kernels.fused_add_rms_norm(x, residual, w, EPS)
    assert_close(residual, res_ref, dtype)
    assert_close(x, x_ref, dtype)


@pytest.mark.parametrize("device,dtype", [*(p for p in DEVICE_DTYPES if p.values[1] != torch.float32),
                                          pytest.param("cpu", torch.float16, id="cpu-fp16")])
@pytest.mark.parametrize("add", [False, True], ids=["norm", "fused_add"])
def test_fp32_weight_rounds_once(kernels, device, dtype, add):
    """With an fp32 weight the kernels match the reference almost bit for bit, and the
    reference (one rounding) differs from rounding the normalized value first: the check
    tells the two apart, which the dtype tolerance alone would not."""
    x = torch.randn(64, 1024, dtype=dtype, device=device) * 3
    res = torch.randn(64, 1024, dtype=dtype, device=device)
    w = 1 + 0.3 * torch.randn(1024, device=device)
    if add:
        out, expected, res_ref = x.clone(), x.clone(), res.clone()
        kernels.fused_add_rms_norm(out, res, w, EPS)
        reference.fused_add_rms_norm(expected, res_ref, w, EPS)
        torch.testing.assert_close(res, res_ref, rtol=0, atol=0)
        normed_input = res_ref
    else:
        out, expected, normed_input = kernels.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), x
    twice = reference.rms_norm(normed_input, w.to(dtype), EPS)  # Qwen3 order: rounds before the scale
    assert (out != expected).float().mean().item() < 0.002
    assert (twice != expected).float().mean().item() > 0.02
    assert_close(out, expected, dtype)


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
    with raises(device, "dtype"):  # an fp32 weight, yes; another half type, no
        kernels.rms_norm(x.half(), torch.ones(64, device=device, dtype=torch.bfloat16), EPS)
    with raises(device, "stride"):
        kernels.rms_norm(torch.randn(64, 4, device=device).t(), torch.ones(4, device=device), EPS)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_opcheck(kernels, device):
    x = torch.randn(3, 5, 64, device=device)
    w = torch.randn(64, device=device)
    torch.library.opcheck(torch.ops.splitvl.rms_norm.default, (torch.empty_like(x), x, w, EPS))
    res = torch.randn_like(x)
    torch.library.opcheck(torch.ops.splitvl.fused_add_rms_norm.default, (x.clone(), res, w, EPS))
    xb, rb = x.bfloat16(), res.bfloat16()
    torch.library.opcheck(torch.ops.splitvl.rms_norm.default, (torch.empty_like(xb), xb, w, EPS))
    torch.library.opcheck(torch.ops.splitvl.fused_add_rms_norm.default, (xb.clone(), rb, w, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_transformers_qwen3_5_rmsnorm(dtype):
    """fp32 weight `1 + w` with an input of any float dtype: transformers' Qwen3_5RMSNorm."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    norm = Qwen3_5RMSNorm(96, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96) * 0.3)
        x = (torch.randn(5, 3, 96) * 3).to(dtype)
        got = reference.rms_norm(x, 1 + norm.weight.float(), EPS)
        torch.testing.assert_close(got, norm(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers_qwen3_rmsnorm(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
        x = torch.randn(5, 3, 96, dtype=dtype)
        torch.testing.assert_close(reference.rms_norm(x, norm.weight, EPS), norm(x), rtol=0, atol=0)
