"""Small-row dense linears (linear_small, gate_up_silu_small) vs their references: rows 1..16
and beyond, K and N tails, split-K clusters, strided and unaligned inputs (the ATen path),
bias, CUDA-graph capture, opcheck."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.common import DEVICE_DTYPES, DEVICES, GPU, assert_close, assert_graph_replay_equals_eager, raises


def _inputs(m: int, k: int, n: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(m, k).to(device, dtype)
    w = (torch.randn(n, k) / k**0.5).to(device, dtype)
    return x, w


# (M, K, N): one row; odd M with K and N tails (K % 32 = 8, N % 32 = 5); a full 16-row block;
# 17 and 37 rows (several 16-row blocks); K % 8 != 0 (ATen path); a long K over few columns
# (the 30B-A3B router: 8-CTA clusters); the 0.8B gate_up width (4-CTA clusters); N = 1.
SHAPES = [(1, 64, 32), (3, 328, 37), (16, 200, 96), (17, 136, 40), (37, 64, 70), (5, 100, 33),
          (1, 2048, 128), (4, 1024, 2048), (2, 4104, 1)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_linear_small_matches_reference(kernels, device, dtype, m, k, n, bias):
    x, w = _inputs(m, k, n, device, dtype)
    b = torch.randn(n).to(device, dtype) if bias else None
    assert_close(kernels.linear_small(x, w, b), reference.linear_small(x, w, b), dtype)


# (M, K, I): one row at the 0.8B MLP (K 1024, I 3584) and odd sizes with K and I tails.
GATED_SHAPES = [(1, 1024, 3584), (5, 328, 88), (16, 136, 40), (20, 64, 24), (3, 100, 17)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("m,k,inter", GATED_SHAPES)
def test_gate_up_silu_small_matches_reference(kernels, device, dtype, m, k, inter):
    x, w = _inputs(m, k, 2 * inter, device, dtype)
    assert_close(kernels.gate_up_silu_small(x, w), reference.gate_up_silu_small(x, w), dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_strided_and_unaligned_rows(kernels, device, dtype):
    """x as columns of a wider tensor (row stride 520: streamed), or starting one element in
    (unaligned: the ATen path); both equal the reference on a contiguous copy."""
    wide = torch.randn(6, 520).to(device, dtype)
    _, w = _inputs(1, 256, 48, device, dtype)
    for x in (wide[:, 8:264], wide[:, 1:257]):
        assert not x.is_contiguous()
        assert_close(kernels.linear_small(x, w), reference.linear_small(x.contiguous(), w), dtype)
        w2 = torch.cat([w, w.flip(0)])
        assert_close(kernels.gate_up_silu_small(x, w2), reference.gate_up_silu_small(x.contiguous(), w2), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_and_columns(kernels, device):
    x, w = _inputs(0, 64, 8, device, torch.float32)
    assert kernels.linear_small(x, w).shape == (0, 8)
    x, w = _inputs(3, 64, 0, device, torch.float32)
    assert kernels.linear_small(x, w).shape == (3, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_mismatched_shapes_and_dtypes(kernels, device):
    x, w = _inputs(2, 64, 8, device, torch.float32)
    with raises(device, "weight"):
        kernels.linear_small(x, w[:, :32])
    with raises(device, "bias"):
        kernels.linear_small(x, w, torch.randn(7, device=device))
    with raises(device, "dtype"):
        kernels.linear_small(x, w.to(torch.bfloat16))
    with raises(device, "gate then up"):
        kernels.gate_up_silu_small(x, w[:7])


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_full_size_decoder_linears(kernels, dtype, m):
    """The dense linears of the 0.8B, 8B and 30B-A3B decoders (K, N) at decode rows."""
    for k, n in [(1024, 2048), (1024, 6144), (3584, 1024), (2048, 5120), (4096, 2048), (2048, 128),
                 (4096, 6144), (4096, 24576)]:
        x, w = _inputs(m, k, n, "cuda", dtype)
        assert_close(kernels.linear_small(x, w), reference.linear_small(x, w), dtype)
    x, w = _inputs(m, 4096, 2 * 12288, "cuda", dtype)
    assert_close(kernels.gate_up_silu_small(x, w), reference.gate_up_silu_small(x, w), dtype)


@GPU
def test_capture_in_a_cuda_graph(kernels):
    """Clustered (router shape) and plain launches record into a graph and replay == eager."""
    x, w = _inputs(1, 2048, 128, "cuda", torch.bfloat16)
    _, w2 = _inputs(1, 2048, 2 * 768, "cuda", torch.bfloat16)
    _, w3 = _inputs(1, 2048, 40000, "cuda", torch.bfloat16)

    def step() -> tuple[torch.Tensor, ...]:
        return kernels.linear_small(x, w), kernels.gate_up_silu_small(x, w2), kernels.linear_small(x, w3)

    assert_graph_replay_equals_eager(step, lambda: x.copy_(torch.randn_like(x)))


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=GPU)])
def test_opcheck(kernels, device, dtype):
    x, w = _inputs(3, 64, 40, device, dtype)
    b = torch.randn(40).to(device, dtype)
    out = torch.empty(3, 40, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.splitvl.linear_small.default, (out, x, w, b))
    torch.library.opcheck(torch.ops.splitvl.linear_small.default, (out, x, w, None))
    gated = torch.empty(3, 20, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.splitvl.gate_up_silu_small.default, (gated, x, w))
