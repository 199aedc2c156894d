"""add_rms_norm_linear_small (fused_add_rms_norm then linear_small in one op) vs its reference
and vs the two ops called in turn: rows 1..16 and beyond, K and N tails, K % 8 != 0 and
unaligned rows (the composed path), rows over 1024 packs, strided x and residual, bias, both
norm-weight kinds, the decoders' qkv shapes, CUDA-graph capture, PDL on and off, opcheck."""

from __future__ import annotations

import pytest
import torch

import ops as ops_package
from ops import reference
from tests.ops.common import DEVICE_DTYPES, DEVICES, GPU, assert_close, assert_graph_replay_equals_eager, raises

EPS = 1e-6

# (device, x dtype, norm weight dtype): the weight in x's dtype (Qwen3) or fp32 (Qwen3.5's 1 + w).
NORM_DTYPES = [pytest.param(*p.values, p.values[1], marks=p.marks, id=p.id) for p in DEVICE_DTYPES] + [
    pytest.param(*p.values, torch.float32, marks=p.marks, id=p.id + "-w32")
    for p in DEVICE_DTYPES
    if p.values[1] != torch.float32
]

# (M, K, N): one row; odd M with K and N tails; a full 16-row block; 17 rows (two blocks);
# K % 8 != 0 (composed path); few columns over a long K (8-CTA clusters); K over 1024 packs
# of 8 (the norm's threads sum several packs each); a norm in warp mode (K <= 1024).
SHAPES = [(1, 64, 32), (3, 328, 37), (16, 200, 96), (17, 136, 40), (5, 100, 33), (1, 2048, 128),
          (2, 8456, 40), (4, 1024, 72)]


def _inputs(m: int, k: int, n: int, device: str, dtype: torch.dtype, wdtype: torch.dtype, bias: bool):
    x = torch.randn(m, k).to(device, dtype)
    residual = (torch.randn(m, k) * 4).to(device, dtype)
    norm_weight = (1 + 0.1 * torch.randn(k)).to(device, wdtype)
    w = (torch.randn(n, k) / k**0.5).to(device, dtype)
    b = torch.randn(n).to(device, dtype) if bias else None
    return x, residual, norm_weight, w, b


def _two_ops(kernels, x, residual, norm_weight, w, b) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain the op replaces: fused_add_rms_norm in place on copies, then linear_small."""
    normed, new_residual = x.clone(), residual.clone()
    kernels.fused_add_rms_norm(normed, new_residual, norm_weight, EPS)
    return kernels.linear_small(normed, w, b), new_residual


@pytest.mark.parametrize("device,dtype,wdtype", NORM_DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matches_reference_and_leaves_inputs(kernels, device, dtype, wdtype, m, k, n, bias):
    x, residual, norm_weight, w, b = _inputs(m, k, n, device, dtype, wdtype, bias)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w, b)
    want_out, want_residual = reference.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w, b)
    assert out.shape == (m, n) and new_residual.shape == (m, k) and new_residual.is_contiguous()
    torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)
    assert_close(out, want_out, dtype)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    torch.testing.assert_close(residual, residual_before, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype,wdtype", NORM_DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_equals_the_two_ops(kernels, device, dtype, wdtype, m, k, n):
    """Bit for bit: the CUDA kernel replays fused_add_rms_norm's sum order and linear_small's
    stream; the CPU kernel calls the two ops."""
    x, residual, norm_weight, w, b = _inputs(m, k, n, device, dtype, wdtype, True)
    out, new_residual = kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w, b)
    want_out, want_residual = _two_ops(kernels, x, residual, norm_weight, w, b)
    torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype,wdtype", NORM_DTYPES)
def test_strided_and_unaligned_rows(kernels, device, dtype, wdtype):
    """x and residual as columns of wider tensors (row stride 520: the fused kernel on CUDA), or
    starting one element in (unaligned: the composed path); both equal the reference on
    contiguous copies and the two ops on the same views."""
    wide_x = torch.randn(6, 520).to(device, dtype)
    wide_r = torch.randn(6, 520).to(device, dtype)
    _, _, norm_weight, w, b = _inputs(1, 256, 48, device, dtype, wdtype, True)
    for start in (8, 1):
        x, residual = wide_x[:, start : start + 256], wide_r[:, start : start + 256]
        assert not x.is_contiguous()
        out, new_residual = kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w, b)
        want_out, want_residual = reference.add_rms_norm_linear_small(
            x.contiguous(), residual.contiguous(), norm_weight, EPS, w, b
        )
        torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)
        assert_close(out, want_out, dtype)
        chain_out, _ = _two_ops(kernels, x, residual, norm_weight, w, b)
        torch.testing.assert_close(out, chain_out, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_and_columns(kernels, device):
    x, residual, norm_weight, w, _ = _inputs(0, 64, 8, device, torch.float32, torch.float32, False)
    out, new_residual = kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w)
    assert out.shape == (0, 8) and new_residual.shape == (0, 64)
    x, residual, norm_weight, w, _ = _inputs(3, 64, 0, device, torch.float32, torch.float32, False)
    out, new_residual = kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w)
    assert out.shape == (3, 0)
    torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_input(kernels, device):
    x, residual, norm_weight, w, _ = _inputs(2, 64, 8, device, torch.float32, torch.float32, False)
    with raises(device, "residual"):
        kernels.add_rms_norm_linear_small(x, residual[:, :32], norm_weight, EPS, w)
    with raises(device, "residual"):
        kernels.add_rms_norm_linear_small(x, residual.double(), norm_weight, EPS, w)
    with raises(device, "norm_weight"):
        kernels.add_rms_norm_linear_small(x, residual, norm_weight[:32], EPS, w)
    with raises(device, "norm_weight"):
        kernels.add_rms_norm_linear_small(x.half(), residual.half(), norm_weight.double(), EPS, w.half())
    with raises(device, "weight"):
        kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w[:, :32])
    with raises(device, "bias"):
        kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w, torch.randn(7, device=device))
    with raises(device, "dtype"):
        kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w.to(torch.bfloat16))


def test_reference_rejects_mismatched_residual():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="residual"):
        reference.add_rms_norm_linear_small(x, torch.randn(2, 4), torch.ones(8), EPS, torch.randn(3, 8))


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("wdtype", ["x", torch.float32], ids=["w-x", "w32"])
def test_decoder_qkv_shapes(kernels, dtype, m, wdtype):
    """The qkv projections of the 0.8B (1024 -> 6144 with Qwen3.5's gate), 30B-A3B (2048 -> 5120)
    and 8B (4096 -> 6144) decoders, and a 5120-wide input, at decode rows."""
    wd = dtype if wdtype == "x" else wdtype
    for k, n in [(1024, 6144), (2048, 5120), (4096, 6144), (5120, 9216)]:
        args = _inputs(m, k, n, "cuda", dtype, wd, False)
        out, new_residual = kernels.add_rms_norm_linear_small(*args[:3], EPS, *args[3:])
        want_out, want_residual = reference.add_rms_norm_linear_small(*args[:3], EPS, *args[3:])
        assert_close(out, want_out, dtype)
        torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)
        chain_out, _ = _two_ops(kernels, *args)
        torch.testing.assert_close(out, chain_out, rtol=0, atol=0)


@GPU
def test_pdl_on_and_off_agree(kernels):
    args = _inputs(2, 2048, 5120, "cuda", torch.bfloat16, torch.bfloat16, False)
    with ops_package.programmatic_launch(True):
        on = kernels.add_rms_norm_linear_small(*args[:3], EPS, *args[3:])
    with ops_package.programmatic_launch(False):
        off = kernels.add_rms_norm_linear_small(*args[:3], EPS, *args[3:])
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@GPU
def test_capture_in_a_cuda_graph(kernels):
    """A norm + qkv step after a kernel that writes x records into a graph; replay == eager."""
    x, residual, norm_weight, w, _ = _inputs(1, 2048, 5120, "cuda", torch.bfloat16, torch.bfloat16, False)
    source = torch.randn_like(x)

    def step() -> tuple[torch.Tensor, ...]:
        x.copy_(source * 2)  # the producer kernel the fused one waits for under PDL
        return kernels.add_rms_norm_linear_small(x, residual, norm_weight, EPS, w)

    assert_graph_replay_equals_eager(step, lambda: source.copy_(torch.randn_like(source)))


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=GPU)])
def test_opcheck(kernels, device, dtype):
    x, residual, norm_weight, w, b = _inputs(3, 64, 40, device, dtype, dtype, True)
    out = torch.empty(3, 40, device=device, dtype=dtype)
    new_residual = torch.empty(3, 64, device=device, dtype=dtype)
    op = torch.ops.splitvl.add_rms_norm_linear_small.default
    torch.library.opcheck(op, (out, new_residual, x, residual, norm_weight, EPS, w, b))
    torch.library.opcheck(op, (out, new_residual, x, residual, norm_weight, EPS, w, None))
