"""moe_decode_block (a MoE layer's add + norm, router, routing, experts and combine in one op)
against its reference and the chain of ops it replaces (bit for bit on CPU); on the GPU also
the one-launch kernel at the 30B-A3B shape, which kernel ran, graph replays and opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops import reference, reference_moe
from tests.ops.common import DEVICE_DTYPES, DEVICES, GPU, assert_close, raises

# (tokens, experts, hidden, inter, k): kernel shapes (T 1..8, k 1 and 8, odd E), then the
# chain's: T > MOE_DECODE_BLOCK_MAX_TOKENS, H and I not multiples of a 16-bit pack, E > 512,
# no tokens.
BLOCK = [(1, 16, 256, 96, 4), (3, 60, 136, 40, 8), (8, 32, 64, 24, 2), (2, 8, 64, 16, 1),
         (9, 8, 64, 16, 2), (2, 7, 100, 12, 3), (2, 16, 64, 20, 4), (3, 600, 32, 8, 4), (0, 8, 16, 8, 2)]


def _inputs(tokens, experts, hidden, inter, device, dtype, norm_fp32=False, stride_pad=0):
    """x, residual (column slices of wider tensors when stride_pad > 0), norm and MoE weights."""
    x = torch.randn(tokens, hidden + stride_pad)[:, stride_pad:].to(device, dtype)
    residual = torch.randn(tokens, hidden + stride_pad).to(device, dtype)[:, stride_pad:]
    norm_weight = (1 + torch.randn(hidden) / 4).to(device, torch.float32 if norm_fp32 else dtype)
    gate = (4 * torch.randn(experts, hidden) / hidden**0.5).to(device, dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden) / hidden**0.5).to(device, dtype)
    down = (torch.randn(experts, hidden, inter) / inter**0.5).to(device, dtype)
    return x, residual, norm_weight, gate, gate_up, down


def _chain(ops, x, residual, norm_weight, eps, gate, gate_up, down, k, renormalize):
    """The ops moe_decode_block replaces, as the model composed them (residual updated in place)."""
    normed = x.clone()
    ops.fused_add_rms_norm(normed, residual, norm_weight, eps)
    weights, _, alignment = ops.moe_route(F.linear(normed, gate), k, renormalize)
    rows = ops.moe_down(ops.moe_gate_up(normed, gate_up, alignment), down, weights, alignment)
    return ops.moe_combine(rows, alignment, None)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens,experts,hidden,inter,k", BLOCK)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("norm_fp32,stride_pad", [(False, 0), (True, 8), (False, 3)])
def test_moe_decode_block_matches_reference_and_chain(
    kernels, device, dtype, tokens, experts, hidden, inter, k, renormalize, norm_fp32, stride_pad
):
    x, residual, norm_weight, gate, gate_up, down = _inputs(
        tokens, experts, hidden, inter, device, dtype, norm_fp32, stride_pad
    )
    eps = 1e-6
    x_before = x.clone()
    barrier = torch.zeros(1, dtype=torch.int32, device=device)
    res_ref, res_chain = residual.clone(), residual.clone()
    out_ref, _ = reference_moe.moe_decode_block(
        x, res_ref, norm_weight, eps, gate, gate_up, down, k, renormalize, barrier
    )
    out_chain = _chain(kernels, x, res_chain, norm_weight, eps, gate, gate_up, down, k, renormalize)
    res_first = residual.clone()
    out, res = kernels.moe_decode_block(x, residual, norm_weight, eps, gate, gate_up, down, k, renormalize, barrier)
    assert res is residual and out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # x is read only
    assert int(barrier.item()) & 0x7FFFFFFF == 0  # the low bits are back to 0
    if device == "cpu":
        torch.testing.assert_close(res, res_chain, rtol=0, atol=0)
        torch.testing.assert_close(out, out_chain, rtol=0, atol=0)
    else:
        assert_close(res, res_chain, dtype)
        assert_close(out, out_chain, dtype, scale=2)
    assert_close(res, res_ref, dtype)
    assert_close(out, out_ref, dtype, scale=2)
    # A second call (the barrier's top bit flipped, or not) from the same residual: the same out.
    again, _ = kernels.moe_decode_block(x, res_first, norm_weight, eps, gate, gate_up, down, k, renormalize, barrier)
    if device == "cuda" and stride_pad % 8:  # unaligned rows run the chain: its split reductions may reorder
        assert_close(again, out, dtype)
    else:
        torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert int(barrier.item()) & 0x7FFFFFFF == 0


def test_reference_is_the_chain_of_references():
    x, residual, norm_weight, gate, gate_up, down = _inputs(3, 9, 40, 12, "cpu", torch.bfloat16)
    barrier = torch.zeros(1, dtype=torch.int32)
    res_a, res_b = residual.clone(), residual.clone()
    out, _ = reference_moe.moe_decode_block(x, res_a, norm_weight, 1e-5, gate, gate_up, down, 3, True, barrier)

    class References:
        fused_add_rms_norm = staticmethod(reference.fused_add_rms_norm)
        moe_route = staticmethod(reference_moe.moe_route)
        moe_gate_up = staticmethod(reference_moe.moe_gate_up)
        moe_down = staticmethod(reference_moe.moe_down)
        moe_combine = staticmethod(reference_moe.moe_combine)

    chain = _chain(References, x, res_b, norm_weight, 1e-5, gate, gate_up, down, 3, True)
    torch.testing.assert_close(res_a, res_b, rtol=0, atol=0)
    torch.testing.assert_close(out, chain, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_decode_block_bad_input(kernels, device):
    x, residual, norm_weight, gate, gate_up, down = _inputs(2, 8, 64, 16, device, torch.float32)
    barrier = torch.zeros(1, dtype=torch.int32, device=device)
    with raises(device, "gate_weight must be"):
        kernels.moe_decode_block(x, residual, norm_weight, 1e-6, gate.half(), gate_up, down, 2, True, barrier)
    with raises(device, "down_proj must be"):
        kernels.moe_decode_block(x, residual, norm_weight, 1e-6, gate, gate_up, down[:, :, :8], 2, True, barrier)
    with raises(device, "gate_up_proj must be"):
        kernels.moe_decode_block(x, residual, norm_weight, 1e-6, gate, gate_up[:, :31], down, 2, True, barrier)
    with raises(device, "topk"):
        kernels.moe_decode_block(x, residual, norm_weight, 1e-6, gate, gate_up, down, 9, True, barrier)
    with raises(device, "barrier must be"):
        kernels.moe_decode_block(x, residual, norm_weight, 1e-6, gate, gate_up, down, 2, True, barrier.long())
    with raises(device, "x and residual must be"):
        kernels.moe_decode_block(x, residual[:1], norm_weight, 1e-6, gate, gate_up, down, 2, True, barrier)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_decode_block_opcheck(kernels, device):
    x, residual, norm_weight, gate, gate_up, down = _inputs(2, 8, 64, 16, device, torch.float32)
    out = torch.empty(2, 64, device=device)
    residual = residual.contiguous()
    barrier = torch.zeros(1, dtype=torch.int32, device=device)
    torch.library.opcheck(
        torch.ops.splitvl.moe_decode_block.default,
        (out, residual, barrier, x, norm_weight, 1e-6, gate, gate_up, down, 2, True),
    )


def _kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 4, 8])
def test_moe_decode_block_30b_a3b_gpu(kernels, dtype, tokens):
    """The 30B-A3B block (E 128, H 2,048, I 768, top-8) in one launch == the reference and the chain."""
    x, residual, norm_weight, gate, gate_up, down = _inputs(tokens, 128, 2048, 768, "cuda", dtype)
    barrier = torch.zeros(1, dtype=torch.int32, device="cuda")
    res_ref, res_chain = residual.clone(), residual.clone()
    out_ref, _ = reference_moe.moe_decode_block(x, res_ref, norm_weight, 1e-6, gate, gate_up, down, 8, True, barrier)
    out_chain = _chain(kernels, x, res_chain, norm_weight, 1e-6, gate, gate_up, down, 8, True)
    result = []
    names = _kernel_names(lambda: result.append(
        kernels.moe_decode_block(x, residual, norm_weight, 1e-6, gate, gate_up, down, 8, True, barrier)))
    assert sum("moe_decode_block_kernel" in n for n in names) == 1, names  # the kernel alone, once
    assert not any("moe_gemv" in n or "gemm" in n.lower() for n in names), names
    assert int(barrier.item()) & 0x7FFFFFFF == 0
    out = result[0][0]
    assert_close(residual, res_chain, dtype)
    assert_close(residual, res_ref, dtype)
    assert_close(out, out_chain, dtype, scale=2)
    assert_close(out, out_ref, dtype, scale=2)


@GPU
def test_moe_decode_block_falls_back_beyond_the_kernel(kernels):
    """T = 9 runs the chain (no block kernel), and still equals the reference."""
    x, residual, norm_weight, gate, gate_up, down = _inputs(9, 16, 64, 16, "cuda", torch.bfloat16)
    barrier = torch.zeros(1, dtype=torch.int32, device="cuda")
    res_ref = residual.clone()
    out_ref, _ = reference_moe.moe_decode_block(x, res_ref, norm_weight, 1e-6, gate, gate_up, down, 4, True, barrier)
    result = []
    names = _kernel_names(lambda: result.append(
        kernels.moe_decode_block(x, residual, norm_weight, 1e-6, gate, gate_up, down, 4, True, barrier)))
    assert not any("moe_decode_block_kernel" in n for n in names), names
    assert_close(result[0][0], out_ref, torch.bfloat16, scale=2)
    assert_close(residual, res_ref, torch.bfloat16)


@GPU
@pytest.mark.parametrize("tokens", [1, 3])
def test_moe_decode_block_graph_replays_equal_eager_gpu(kernels, tokens):
    """Captured in a CUDA graph, the op replays (three times: the barrier needs no reset) to the
    eager call's out and residual, bit for bit (the kernel is deterministic)."""
    x, residual, norm_weight, gate, gate_up, down = _inputs(tokens, 128, 512, 192, "cuda", torch.bfloat16)
    barrier = torch.zeros(1, dtype=torch.int32, device="cuda")
    start = residual.clone()
    eager, _ = kernels.moe_decode_block(x, residual, norm_weight, 1e-6, gate, gate_up, down, 8, True, barrier)
    eager_res = residual.clone()
    work = start.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.moe_decode_block(x, work, norm_weight, 1e-6, gate, gate_up, down, 8, True, barrier)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = kernels.moe_decode_block(x, work, norm_weight, 1e-6, gate, gate_up, down, 8, True, barrier)
    for _ in range(3):
        work.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        torch.testing.assert_close(work, eager_res, rtol=0, atol=0)
    assert int(barrier.item()) & 0x7FFFFFFF == 0
