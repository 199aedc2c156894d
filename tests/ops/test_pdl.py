"""Programmatic dependent launch (ops/csrc/cuda/pdl.cuh): the switch, and results that do not depend on it.

A PDL kernel starts while the kernel before it drains and must wait before reading what that
kernel writes. Each GPU test runs a long chain of dependent decode-path ops whose data change
every link (the output of one feeds the next; caches and states are updated in place), three
ways: eagerly with PDL off (the reference), eagerly with PDL on, and as one captured CUDA graph
with PDL on, where the kernels run back to back and a missing wait reads the previous link's
data. All three must agree bit for bit: PDL changes scheduling, never arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import ops
from bench.pdl_bisect import attention_setup, run, split_qkv
from tests.ops.common import GPU

Chain = Callable[[torch.Tensor, int], torch.Tensor]  # (link input, link index) -> link output
LINKS = 24


def _run(link: Chain, x0: torch.Tensor, buffers: list[torch.Tensor], pdl: bool, graph: bool) -> list[torch.Tensor]:
    """Every link's output and the in-place `buffers` after LINKS links from their initial values
    (each link takes the previous one's output)."""
    state = {"x": x0}

    def step(i: int) -> torch.Tensor:
        state["x"] = link(state["x"], i)
        return state["x"]

    return run(step, buffers, LINKS, pdl, graph)


def _check(link: Chain, x0: torch.Tensor, buffers: list[torch.Tensor]) -> None:
    want = _run(link, x0, buffers, pdl=False, graph=False)
    assert len({float(o.float().abs().sum()) for o in want[:LINKS]}) > LINKS // 2, "the data must change"
    for pdl, graph in ((True, False), (True, True), (False, True)):
        got = _run(link, x0, buffers, pdl, graph)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"pdl={pdl} graph={graph}: tensor {i} differs from eager without PDL"


def _randn(*shape: int, scale: float = 1.0, dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


@GPU
@pytest.mark.parametrize("rows", [1, 3])
def test_dense_chain(rows):
    # norm -> linear_small -> fused add + norm -> gate_up_silu_small -> linear_small (+ silu_and_mul)
    torch.manual_seed(0)
    h, inter = 2048, 1536
    w_in, w_gu = _randn(h, h, scale=h**-0.5), _randn(2 * inter, h, scale=h**-0.5)
    w_down = _randn(h, inter, scale=inter**-0.5)
    n1, n2 = torch.rand(h, device="cuda") + 0.5, _randn(h).abs() + 0.5
    residual = _randn(rows, h)

    def link(x: torch.Tensor, i: int) -> torch.Tensor:
        y = ops.linear_small(ops.rms_norm(x, n1, 1e-6), w_in, None)
        ops.fused_add_rms_norm(y, residual, n2, 1e-6)
        g = ops.gate_up_silu_small(y, w_gu) if i % 2 else ops.silu_and_mul(ops.linear_small(y, w_gu, None))
        return ops.linear_small(g, w_down, None)

    _check(link, _randn(rows, h), [residual])


@GPU
@pytest.mark.parametrize("fused_cache", [False, True], ids=["two-ops", "qk_norm_rope_and_cache"])
def test_attention_chain(fused_cache):
    # linear_small -> qk_norm_rope -> reshape_and_cache (or the two in one op) -> paged decode
    # (+ merge at long context) -> sigmoid_gate_mul -> linear_small, one new cached token per
    # sequence and link.
    torch.manual_seed(1)
    context = 2000
    a = attention_setup(context, LINKS, context - 700)

    def link(x: torch.Tensor, i: int) -> torch.Tensor:
        q, gate, k, v = split_qkv(a, ops.linear_small(x, a.w_qkv, None))
        if fused_cache:
            ops.qk_norm_rope_and_cache(a.positions[i], q, k, v, a.qw, a.kw, 1e-6, a.cos_sin, a.key_cache,
                                       a.value_cache, a.slots[i], True, None, False)
        else:
            ops.qk_norm_rope(a.positions[i], q, k, a.qw, a.kw, 1e-6, a.cos_sin, True, None, False)
            ops.reshape_and_cache(k, v, a.key_cache, a.value_cache, a.slots[i])
        out = ops.paged_attention_decode(q, a.key_cache, a.value_cache, a.tables, a.lens[i], a.d**-0.5)
        return ops.linear_small(ops.sigmoid_gate_mul(out, gate).flatten(1), a.w_o, None)

    _check(link, _randn(a.batch, a.h), [a.key_cache, a.value_cache])


@GPU
def test_gated_delta_net_chain():
    # in_proj (linear_small) -> gated_delta_net_decode (conv and recurrent states in place) -> out_proj
    torch.manual_seed(2)
    batch, hk, hv, dk, dv, width, h = 2, 4, 8, 128, 128, 4, 1024
    conv_dim = 2 * hk * dk + hv * dv
    w_in = _randn(conv_dim + hv * dv + 2 * hv, h, scale=h**-0.5)
    w_out = _randn(h, hv * dv, scale=(hv * dv) ** -0.5)
    conv_weight = _randn(conv_dim, width, scale=0.5)
    a_log, dt_bias = torch.rand(hv, device="cuda").log(), torch.rand(hv, device="cuda")
    norm_w = _randn(dv).abs() + 0.5
    conv_states = _randn(4, conv_dim, width - 1)
    rec_states = torch.randn(4, hv, dk, dv, device="cuda") * 0.1
    slots = torch.tensor([2, 0], device="cuda", dtype=torch.int32)

    def link(x: torch.Tensor, i: int) -> torch.Tensor:
        out = ops.gated_delta_net_decode(ops.linear_small(x, w_in, None), conv_weight, conv_states, a_log, dt_bias,
                                         rec_states, slots, norm_w, 1e-6, True)
        return ops.rms_norm(ops.linear_small(out.view(batch, hv * dv), w_out, None), norm_w.new_ones(h), 1e-6)

    _check(link, _randn(batch, h), [conv_states, rec_states])


@GPU
@pytest.mark.parametrize("tokens", [1, 4])
def test_moe_chain(tokens):
    # router (linear_small) -> moe_route -> moe_gate_up -> moe_down -> moe_combine -> fused add + norm
    torch.manual_seed(3)
    experts, top_k, h, inter = 64, 8, 1024, 384
    router = _randn(experts, h, scale=h**-0.5 * 8)
    w_gu = _randn(experts, 2 * inter, h, scale=h**-0.5)
    w_down = _randn(experts, h, inter, scale=inter**-0.5)
    norm = torch.rand(h, device="cuda") + 0.5
    residual = _randn(tokens, h)

    def link(x: torch.Tensor, i: int) -> torch.Tensor:
        weights, _, alignment = ops.moe_route(ops.linear_small(x, router, None), top_k, True)
        y = ops.moe_combine(ops.moe_down(ops.moe_gate_up(x, w_gu, alignment), w_down, weights, alignment), alignment)
        ops.fused_add_rms_norm(y, residual, norm, 1e-6)
        return y

    _check(link, _randn(tokens, h), [residual])
