"""Qwen3.5 linear-attention ops: kernels vs references, references vs transformers,
state carry-over (split prefill, prefill + decode), bad input, opcheck (gated_rms_norm's
kernels: test_gated_rms_norm.py, gdn_gating's: test_gdn_gating.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from ops import reference_linear_attn as ref
from tests.ops.common import CUDA_DTYPES, DEVICE_DTYPES, DEVICES, assert_close, raises

LENS = [1, 70, 130, 3, 0, 64]  # one token, > 1 chunk, > 2 chunks, empty, exactly one chunk
CONV_DIM, WIDTH = 37, 4
HEADS = [pytest.param((2, 4, 16, 40), id="gqa-dv40"), pytest.param((3, 3, 32, 8), id="mha")]


def packed(lens: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def slots_for(batch: int, device: str, none_at: int | None = 2) -> torch.Tensor:
    """A shuffled slot per sequence in a pool of batch + 2 slots; -1 (no slot) at `none_at`."""
    slots = torch.randperm(batch + 2)[:batch].to(torch.int32)
    if none_at is not None:
        slots[none_at] = -1
    return slots.to(device)


def gdr_inputs(tokens: int, heads: tuple[int, int, int, int], dtype, device: str, pad: int = 3):
    """q, k, v as strided views of one fused projection (as the model splits it), g, beta; `pad` extra columns
    per token (3: odd row strides, 0: 16-byte rows when the head dims are multiples of 8)."""
    hk, hv, dk, dv = heads
    fused = torch.randn(tokens, 2 * hk * dk + hv * dv + pad, dtype=dtype, device=device)
    q = fused[:, : hk * dk].view(tokens, hk, dk)
    k = fused[:, hk * dk : 2 * hk * dk].view(tokens, hk, dk)
    v = fused[:, 2 * hk * dk : 2 * hk * dk + hv * dv].view(tokens, hv, dv)
    g = -F.softplus(torch.randn(tokens, hv, device=device) + 1.0)
    beta = torch.rand(tokens, hv, device=device).to(dtype)
    return q, k, v, g, beta


def state_pool(num_slots: int, heads, device: str) -> torch.Tensor:
    hk, hv, dk, dv = heads
    return torch.randn(num_slots, hv, dk, dv, device=device) * 0.5


# ---------------------------------------------------------------- references vs transformers


@pytest.mark.parametrize("with_state", [False, True])
def test_reference_conv_matches_transformers(with_state):
    lens = [9, 2]
    cu = packed(lens, "cpu")
    x = torch.randn(sum(lens), CONV_DIM)
    weight, bias = torch.randn(CONV_DIM, WIDTH), torch.randn(CONV_DIM)
    pool = torch.randn(3, CONV_DIM, WIDTH - 1)
    slots = torch.tensor([2, 0], dtype=torch.int32)
    before = pool.clone()
    has_init = torch.tensor([with_state, with_state])
    out = ref.causal_conv1d_fwd(x, weight, bias, pool, cu, slots, has_init, True)
    for b in range(len(lens)):
        xs = x[cu[b] : cu[b + 1]].T[None]
        if with_state:
            state = before[slots[b]][None].clone()
            expected = hf.causal_conv1d_update(xs, state, weight, bias, "silu")
            torch.testing.assert_close(pool[slots[b]], state[0])
        else:
            expected = hf.causal_conv1d_fn(xs, weight, bias, activation="silu")
        torch.testing.assert_close(out[cu[b] : cu[b + 1]], expected[0].T)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("heads", HEADS)
def test_reference_delta_rule_matches_transformers(with_state, heads):
    lens = [150, 37]
    cu = packed(lens, "cpu")
    q, k, v, g, beta = gdr_inputs(sum(lens), heads, torch.float32, "cpu")
    pool = state_pool(2, heads, "cpu")
    init = pool.clone()
    slots = torch.tensor([1, 0], dtype=torch.int32)
    has_init = torch.tensor([with_state, with_state])
    out = ref.gated_delta_rule_chunked(q, k, v, g, beta, cu, pool, slots, has_init, True)
    for b in range(len(lens)):
        s, e = cu[b], cu[b + 1]
        expected, final = hf.torch_chunk_gated_delta_rule(
            q[None, s:e], k[None, s:e], v[None, s:e], g[None, s:e], beta[None, s:e],
            initial_state=init[slots[b]][None] if with_state else None,
            output_final_state=True, use_qk_l2norm_in_kernel=True,
        )
        torch.testing.assert_close(out[s:e], expected[0])
        torch.testing.assert_close(pool[slots[b]], final[0])


@pytest.mark.parametrize("heads", HEADS)
def test_reference_recurrent_matches_transformers(heads):
    q, k, v, g, beta = gdr_inputs(3, heads, torch.float32, "cpu")
    pool = state_pool(4, heads, "cpu")
    init = pool.clone()
    slots = torch.tensor([3, 0, 2], dtype=torch.int32)
    out = ref.gated_delta_rule_recurrent(q, k, v, g, beta, pool, slots, True)
    expected, final = hf.torch_recurrent_gated_delta_rule(
        q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
        initial_state=init[slots.long()], output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    torch.testing.assert_close(out, expected[:, 0])
    torch.testing.assert_close(pool[slots.long()], final)
    torch.testing.assert_close(pool[1], init[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_gated_rms_norm_matches_transformers(dtype):
    module = hf.Qwen3_5RMSNormGated(48, eps=1e-6)
    assert torch.equal(module.weight, torch.ones(48)), "the reference weight starts at ones (no 1 + w)"
    with torch.no_grad():
        module.weight.normal_()
    module = module.to(dtype)
    x, z = torch.randn(10, 48, dtype=dtype) * 3, torch.randn(10, 48, dtype=dtype)
    torch.testing.assert_close(ref.gated_rms_norm(x, z, module.weight, 1e-6), module(x, z), rtol=0, atol=0)


# ---------------------------------------------------------------- kernels vs references


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_causal_conv1d_fwd_matches_reference(kernels, device, dtype, use_bias):
    cu = packed(LENS, device)
    x = torch.randn(sum(LENS), CONV_DIM + 5, dtype=dtype, device=device)[:, 2 : CONV_DIM + 2]
    weight = torch.randn(CONV_DIM, WIDTH, dtype=dtype, device=device)
    bias = torch.randn(CONV_DIM, dtype=dtype, device=device) if use_bias else None
    pool = torch.randn(len(LENS) + 2, CONV_DIM, WIDTH - 1, dtype=dtype, device=device)
    slots = slots_for(len(LENS), device)
    has_init = (torch.arange(len(LENS), device=device) % 2 == 0)
    expected_pool = pool.clone()
    expected = ref.causal_conv1d_fwd(x, weight, bias, expected_pool, cu, slots, has_init, True)
    out = kernels.causal_conv1d_fwd(x, weight, bias, pool, cu, slots, has_init, True)
    assert_close(out, expected, dtype)
    assert_close(pool, expected_pool, dtype)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("width", [4, 3])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("update_bias", [False, True])
def test_causal_conv1d_vectorized_matches_reference(kernels, dtype, width, aligned, update_bias):
    """16-byte vectors (aligned, dim % 8 == 0) or scalars; token runs crossing sequence ends and
    runs within one sequence; the decode step with and without a bias."""
    lens, dim = [1, 63, 64, 0, 65, 200, 1000, 2], 64
    cu = packed(lens, "cuda")
    offset = 0 if aligned else 1
    x = torch.randn(sum(lens), dim + 8, dtype=dtype, device="cuda")[:, offset : offset + dim]
    weight = torch.randn(dim, width, dtype=dtype, device="cuda")
    bias = torch.randn(dim, dtype=dtype, device="cuda")
    pool = torch.randn(len(lens) + 2, dim, width - 1, dtype=dtype, device="cuda")
    slots = slots_for(len(lens), "cuda", none_at=4)
    has_init = torch.arange(len(lens), device="cuda") % 3 != 1
    expected_pool = pool.clone()
    expected = ref.causal_conv1d_fwd(x, weight, bias, expected_pool, cu, slots, has_init, True)
    out = kernels.causal_conv1d_fwd(x, weight, bias, pool, cu, slots, has_init, True)
    assert_close(out, expected, dtype)
    assert_close(pool, expected_pool, dtype)
    step = torch.randn(len(lens), dim + 8, dtype=dtype, device="cuda")[:, offset : offset + dim]
    step_bias = bias if update_bias else None
    expected = ref.causal_conv1d_update(step, weight, step_bias, expected_pool, slots, False)
    assert_close(kernels.causal_conv1d_update(step, weight, step_bias, pool, slots, False), expected, dtype)
    assert_close(pool, expected_pool, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_causal_conv1d_update_matches_reference(kernels, device, dtype):
    batch = 5
    x = torch.randn(batch, CONV_DIM + 9, dtype=dtype, device=device)[:, 3 : CONV_DIM + 3]  # projection columns
    weight = torch.randn(CONV_DIM, WIDTH, dtype=dtype, device=device)
    bias = torch.randn(CONV_DIM, dtype=dtype, device=device)
    pool = torch.randn(batch + 2, CONV_DIM, WIDTH - 1, dtype=dtype, device=device)
    slots = slots_for(batch, device)
    expected_pool = pool.clone()
    expected = ref.causal_conv1d_update(x, weight, bias, expected_pool, slots, True)
    out = kernels.causal_conv1d_update(x, weight, bias, pool, slots, True)
    assert_close(out, expected, dtype)
    assert_close(pool, expected_pool, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_gated_delta_rule_chunked_matches_reference(kernels, device, dtype, heads):
    cu = packed(LENS, device)
    q, k, v, g, beta = gdr_inputs(sum(LENS), heads, dtype, device)
    pool = state_pool(len(LENS) + 2, heads, device)
    slots = slots_for(len(LENS), device)
    has_init = (torch.arange(len(LENS), device=device) % 2 == 1)
    expected_pool = pool.clone()
    expected = ref.gated_delta_rule_chunked(q, k, v, g, beta, cu, expected_pool, slots, has_init, True)
    out = kernels.gated_delta_rule_chunked(q, k, v, g, beta, cu, pool, slots, has_init, True)
    assert out.shape == v.shape and out.dtype == dtype
    assert_close(out, expected, dtype, scale=10)
    # The CUDA chunk kernel multiplies bf16/fp16 operands on tensor cores (the state is stored in fp32),
    # so its final state carries the input dtype's rounding; the CPU kernel computes in fp32.
    state_dtype = torch.float32 if device == "cpu" or dtype == torch.float32 else dtype
    assert_close(pool, expected_pool, state_dtype, scale=10)


# Chunk-parallel kernels (Dk <= 128; Dv padded to 16: state tiles of 16 columns, output tiles of 64, the
# last one partial at Dv 80), and Dk = 192 (the sequential fallback).
CHUNK_HEADS = HEADS + [pytest.param((2, 2, 128, 128), id="0.8b-heads"), pytest.param((1, 2, 64, 80), id="dv80"),
                       pytest.param((1, 2, 192, 64), id="dk192")]


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("heads", CHUNK_HEADS)
@pytest.mark.parametrize("l2norm", [True, False])
@pytest.mark.parametrize("pad", [pytest.param(3, id="odd-strides"), pytest.param(0, id="16-byte-rows")])
def test_gated_delta_rule_chunked_chunk_edges_match_reference(kernels, dtype, heads, l2norm, pad):
    """Lengths around the chunk size, several sequences, initial state on/off, slot -1; rows read element by
    element (odd strides) and 16 bytes at a time."""
    lens = [1, 63, 64, 65, 200, 1000, 0]
    cu = packed(lens, "cuda")
    q, k, v, g, beta = gdr_inputs(sum(lens), heads, dtype, "cuda", pad)
    if not l2norm:  # |k|^2 ~ 0.6 keeps the un-normalized recurrence stable
        q, k = q * 0.8 * heads[2] ** -0.5, k * 0.8 * heads[2] ** -0.5
    pool = state_pool(len(lens) + 2, heads, "cuda")
    slots = slots_for(len(lens), "cuda", none_at=3)
    has_init = torch.tensor([True, False, True, True, False, True, True], device="cuda")
    expected_pool = pool.clone()
    expected = ref.gated_delta_rule_chunked(q, k, v, g, beta, cu, expected_pool, slots, has_init, l2norm)
    out = kernels.gated_delta_rule_chunked(q, k, v, g, beta, cu, pool, slots, has_init, l2norm)
    assert_close(out, expected, dtype, scale=10)
    assert_close(pool, expected_pool, torch.float32 if dtype == torch.float32 else dtype, scale=10)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("l2norm", [True, False])
def test_gated_delta_rule_recurrent_matches_reference(kernels, device, dtype, l2norm):
    heads = (2, 4, 16, 40)
    q, k, v, g, beta = gdr_inputs(5, heads, dtype, device)
    if not l2norm:
        q, k = q * 0.2, k * 0.2
    pool = state_pool(7, heads, device)
    slots = slots_for(5, device)
    expected_pool = pool.clone()
    expected = ref.gated_delta_rule_recurrent(q, k, v, g, beta, expected_pool, slots, l2norm)
    out = kernels.gated_delta_rule_recurrent(q, k, v, g, beta, pool, slots, l2norm)
    assert_close(out, expected, dtype, scale=10)
    assert_close(pool, expected_pool, torch.float32, scale=10)


# ---------------------------------------------------------------- state carry-over


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [100, 64, 1])
def test_prefill_in_two_chunks_equals_one_pass(kernels, device, split):
    heads, total = (2, 4, 16, 40), 230
    q, k, v, g, beta = gdr_inputs(total, heads, torch.float32, device)
    x = torch.randn(total, CONV_DIM, device=device)
    weight = torch.randn(CONV_DIM, WIDTH, device=device)
    slot = torch.tensor([1], dtype=torch.int32, device=device)
    whole, parts = state_pool(3, heads, device), state_pool(3, heads, device)
    cwhole, cparts = torch.randn(2, 3, CONV_DIM, WIDTH - 1, device=device)
    fresh = torch.tensor([False], device=device)
    cont = torch.tensor([True], device=device)
    o_whole = kernels.gated_delta_rule_chunked(q, k, v, g, beta, packed([total], device), whole, slot, fresh)
    y_whole = kernels.causal_conv1d_fwd(x, weight, None, cwhole, packed([total], device), slot, fresh)
    o_parts, y_parts = [], []
    for (s, e), has in (((0, split), fresh), ((split, total), cont)):
        cu = packed([e - s], device)
        o_parts.append(kernels.gated_delta_rule_chunked(q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], cu, parts, slot, has))
        y_parts.append(kernels.causal_conv1d_fwd(x[s:e], weight, None, cparts, cu, slot, has))
    assert_close(torch.cat(o_parts), o_whole, torch.float32, scale=10)
    assert_close(parts[1], whole[1], torch.float32, scale=10)
    assert_close(torch.cat(y_parts), y_whole, torch.float32)
    assert_close(cparts[1], cwhole[1], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_then_decode_equals_full_prefill(kernels, device):
    heads, prompt, steps = (2, 4, 16, 40), 75, 6
    total = prompt + steps
    q, k, v, g, beta = gdr_inputs(total, heads, torch.float32, device)
    x = torch.randn(total, CONV_DIM, device=device)
    weight, bias = torch.randn(CONV_DIM, WIDTH, device=device), torch.randn(CONV_DIM, device=device)
    slot = torch.tensor([0], dtype=torch.int32, device=device)
    fresh = torch.tensor([False], device=device)
    states, full_states = state_pool(1, heads, device), state_pool(1, heads, device)
    conv, full_conv = torch.randn(2, 1, CONV_DIM, WIDTH - 1, device=device)
    o_full = kernels.gated_delta_rule_chunked(q, k, v, g, beta, packed([total], device), full_states, slot, fresh)
    y_full = kernels.causal_conv1d_fwd(x, weight, bias, full_conv, packed([total], device), slot, fresh)
    cu = packed([prompt], device)
    outs = [kernels.gated_delta_rule_chunked(q[:prompt], k[:prompt], v[:prompt], g[:prompt], beta[:prompt],
                                        cu, states, slot, fresh)]
    ys = [kernels.causal_conv1d_fwd(x[:prompt], weight, bias, conv, cu, slot, fresh)]
    for t in range(prompt, total):
        step = slice(t, t + 1)
        outs.append(kernels.gated_delta_rule_recurrent(q[step], k[step], v[step], g[step], beta[step], states, slot))
        ys.append(kernels.causal_conv1d_update(x[step], weight, bias, conv, slot))
    assert_close(torch.cat(outs), o_full, torch.float32, scale=10)
    assert_close(states, full_states, torch.float32, scale=10)
    assert_close(torch.cat(ys), y_full, torch.float32)
    assert_close(conv, full_conv, torch.float32)


# ---------------------------------------------------------------- bad input, opcheck


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises(kernels, device):
    heads = (2, 4, 16, 8)
    q, k, v, g, beta = gdr_inputs(10, heads, torch.float32, device)
    pool = state_pool(3, heads, device)
    cu, slots = packed([4, 6], device), torch.tensor([0, 1], dtype=torch.int32, device=device)
    with raises(device, "cu_seqlens must be torch.int32|cu_seqlens must be Int"):
        kernels.gated_delta_rule_chunked(q, k, v, g, beta, cu.long(), pool, slots)
    with raises(device, "value heads"):
        kernels.gated_delta_rule_chunked(q, k, v[:, :3], g[:, :3], beta[:, :3], cu, pool[:, :3], slots)
    with raises(device, "states must be contiguous float32"):
        kernels.gated_delta_rule_chunked(q, k, v, g, beta, cu, pool.half(), slots)
    x = torch.randn(10, CONV_DIM, device=device)
    w = torch.randn(CONV_DIM, WIDTH, device=device)
    conv = torch.randn(3, CONV_DIM, WIDTH - 1, device=device)
    with raises(device, "conv_states must be contiguous"):
        kernels.causal_conv1d_fwd(x, w, None, conv[..., :2], cu, slots)
    with raises(device, "weight dtype"):
        kernels.causal_conv1d_fwd(x, w.double(), None, conv, cu, slots)


def test_bad_values_raise_on_cpu(kernels):
    heads = (2, 4, 16, 8)
    q, k, v, g, beta = gdr_inputs(10, heads, torch.float32, "cpu")
    pool = state_pool(3, heads, "cpu")
    slots = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"cu_seqlens\[-1\] = 9"):
        kernels.gated_delta_rule_chunked(q, k, v, g, beta, packed([4, 5], "cpu"), pool, slots)
    with pytest.raises(RuntimeError, match="share a state slot"):
        kernels.gated_delta_rule_chunked(q, k, v, g, beta, packed([4, 6], "cpu"), pool, slots * 0)
    with pytest.raises(RuntimeError, match="out of range for 3 slots"):
        kernels.gated_delta_rule_recurrent(q[:2], k[:2], v[:2], g[:2], beta[:2], pool, slots + 2)
    conv = torch.randn(3, CONV_DIM, WIDTH - 1)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        kernels.causal_conv1d_fwd(torch.randn(10, CONV_DIM), torch.randn(CONV_DIM, WIDTH), None, conv,
                             torch.tensor([0, 7, 6], dtype=torch.int32), slots)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(kernels, device):
    heads = (2, 4, 16, 8)
    lens = [5, 3]
    cu, slots = packed(lens, device), torch.tensor([2, 0], dtype=torch.int32, device=device)
    has_init = torch.tensor([True, False], device=device)
    q, k, v, g, beta = gdr_inputs(8, heads, torch.float32, device)
    pool = state_pool(3, heads, device)
    x = torch.randn(8, CONV_DIM, device=device)
    w, b = torch.randn(CONV_DIM, WIDTH, device=device), torch.randn(CONV_DIM, device=device)
    conv = torch.randn(3, CONV_DIM, WIDTH - 1, device=device)
    ops = torch.ops.splitvl
    cases = [
        (ops.causal_conv1d_fwd.default, (torch.empty_like(x), x, w, b, conv, cu, slots, has_init, True)),
        (ops.causal_conv1d_update.default, (torch.empty_like(x[:2]), x[:2], w, None, conv, slots, True)),
        (ops.gated_delta_rule_chunked.default,
         (torch.empty(v.shape, device=device), q, k, v, g, beta.contiguous(), cu, pool, slots, has_init, True)),
        (ops.gated_delta_rule_recurrent.default,
         (torch.empty(v[:2].shape, device=device), q[:2], k[:2], v[:2], g[:2].contiguous(),
          beta[:2].contiguous(), pool, slots, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
