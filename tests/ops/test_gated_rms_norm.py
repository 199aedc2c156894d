"""gated_rms_norm: kernels vs reference over dtypes, odd sizes and the model's layouts (x the
delta rule's output, z a head view of the fused input projection's columns), bad input, opcheck.
The reference itself is checked against transformers in test_linear_attn.py."""

from __future__ import annotations

import pytest
import torch

from ops import reference_linear_attn as ref
from tests.ops.common import CUDA_DTYPES, DEVICE_DTYPES, DEVICES, assert_close, raises

ALL_DTYPES = [*DEVICE_DTYPES, pytest.param("cpu", torch.float16, id="cpu-fp16")]


def _weight(d: int, dtype: torch.dtype, device: str, fp32: bool) -> torch.Tensor:
    return torch.randn(d, device=device, dtype=torch.float32 if fp32 else dtype)


def _projection_z(t: int, h: int, d: int, dtype: torch.dtype, device: str, lead: int, tail: int) -> torch.Tensor:
    """z [t, h, d] as the model takes it: columns [lead, lead + h * d) of a [t, lead + h * d + tail]
    projection output (two outer strides, so no [t * h, d] view of it exists when lead + tail > 0)."""
    fused = torch.randn(t, lead + h * d + tail, dtype=dtype, device=device) * 2
    return fused[:, lead : lead + h * d].view(t, h, d)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_gated_rms_norm_matches_reference(kernels, device, dtype, weight_fp32):
    t, h, d = 6, 3, 128
    fused = torch.randn(t, 2 * h * d + 7, dtype=dtype, device=device) * 2
    x = fused[:, : h * d].view(t, h, d)  # strided views of one projection
    z = fused[:, h * d + 7 :].view(t, h, d)
    weight = _weight(d, dtype, device, weight_fp32)
    out = kernels.gated_rms_norm(x, z, weight, 1e-6)
    assert out.shape == x.shape and out.is_contiguous() and out.dtype == dtype
    assert_close(out, ref.gated_rms_norm(x, z, weight, 1e-6), dtype)
    odd, gate = torch.randn(2, 5, 769, dtype=dtype, device=device)
    w_odd = torch.randn(769, device=device, dtype=weight.dtype)
    assert_close(kernels.gated_rms_norm(odd, gate, w_odd, 1e-5), ref.gated_rms_norm(odd, gate, w_odd, 1e-5), dtype)


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("t,h,d,lead,tail", [(1, 4, 128, 96, 8), (7, 3, 40, 5, 6), (13, 2, 24, 0, 3)])
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_gated_rms_norm_z_head_view(kernels, device, dtype, t, h, d, lead, tail, weight_fp32):
    """The model's call: z a [T, H, D] head view of projection columns, read by the op in place."""
    x = torch.randn(t, h, d, dtype=dtype, device=device) * 3
    z = _projection_z(t, h, d, dtype, device, lead, tail)
    weight = _weight(d, dtype, device, weight_fp32)
    expected = ref.gated_rms_norm(x, z, weight, 1e-6)
    assert_close(kernels.gated_rms_norm(x, z, weight, 1e-6), expected, dtype)
    # The op itself takes z's three dims (the wrapper passes them on; no [T * H, D] copy).
    out = torch.empty(t * h, d, dtype=dtype, device=device)
    torch.ops.splitvl.gated_rms_norm.default(out, x.view(-1, d), z, weight, 1e-6)
    assert_close(out.view(t, h, d), expected, dtype)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("d", [128, 256, 384, 96, 30])
@pytest.mark.parametrize("weight_fp32", [False, True])
@pytest.mark.parametrize("gap", [8, 1])  # z's columns start 16-byte aligned, or not (1-wide)
def test_gated_rms_norm_vector_widths_match_reference(kernels, dtype, d, weight_fp32, gap):
    """Head rows as the model has them (x and z [T, H, D] views of one projection): 8, 4, 2-wide vectors,
    16 or 32 lanes a row, rows longer than one vector per lane (384), a partial last block of rows."""
    t, h = 37, 5
    fused = torch.randn(t, 2 * h * d + gap, dtype=dtype, device="cuda") * 2
    x = fused[:, : h * d].view(t, h, d)
    z = fused[:, h * d + gap :].view(t, h, d)
    weight = _weight(d, dtype, "cuda", weight_fp32)
    assert_close(kernels.gated_rms_norm(x, z, weight, 1e-6), ref.gated_rms_norm(x, z, weight, 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gated_rms_norm_rejects_bad_input(kernels, device):
    x = torch.randn(6, 16, device=device)
    with raises(device, "weight must be contiguous"):
        kernels.gated_rms_norm(x, x, torch.ones(5, device=device), 1e-6)
    out, w = torch.empty_like(x), torch.ones(16, device=device)
    with raises(device, "z must be"):  # 4 * 2 head rows for 6 rows of x
        torch.ops.splitvl.gated_rms_norm.default(out, x, torch.randn(4, 2, 16, device=device), w, 1e-6)
    with raises(device, "z must be"):
        torch.ops.splitvl.gated_rms_norm.default(out, x, torch.randn(3, 16, 2, device=device).transpose(1, 2), w, 1e-6)
    with raises(device, "z must be"):
        kernels.gated_rms_norm(x, x.double(), w, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gated_rms_norm_opcheck(kernels, device):
    x = torch.randn(12, 40, device=device)
    w = torch.randn(40, device=device)
    ops = torch.ops.splitvl
    torch.library.opcheck(ops.gated_rms_norm.default, (torch.empty_like(x), x, x.flip(0), w, 1e-6))
    z = _projection_z(4, 3, 40, torch.float32, device, 9, 2)
    torch.library.opcheck(ops.gated_rms_norm.default, (torch.empty_like(x), x, z, w, 1e-6))
