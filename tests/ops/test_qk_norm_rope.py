"""qk_norm_rope: the fused per-head q/k RMSNorm + rotary embedding vs its reference (the two ops in a row)."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.common import DEVICE_DTYPES, DEVICES, assert_close, raises
from tests.ops.test_rotary import MAX_POS, make_cache

EPS = 1e-6

# (Hq, Hkv, D, rot_dim, mrope_section, interleaved): Qwen3-VL (full rotary, interleaved mRoPE),
# Qwen3.5 (D 256, partial rotary 0.25), chunked mRoPE, and plain RoPE (positions [T]).
SHAPES = [
    pytest.param(4, 2, 128, 128, [24, 20, 20], True, id="qwen3-vl"),
    pytest.param(8, 2, 256, 64, [11, 11, 10], True, id="qwen3.5-partial"),
    pytest.param(3, 1, 64, 64, [16, 8, 8], False, id="chunked-mrope"),
    pytest.param(2, 2, 96, 32, None, False, id="plain-partial"),
]


def _inputs(device, dtype, tokens, hq, hkv, d, rot_dim, section, wdtype, fused=True, offset=0):
    """Views of one fused qkv output ([T, (Hq + 2 Hkv) D]), as the attention layers pass them;
    `offset` elements before q (1: rows not 16-byte aligned, the kernels' scalar path)."""
    width = (hq + 2 * hkv) * d
    qkv = torch.randn(tokens, width + offset, dtype=dtype, device=device)[:, offset:] * 3
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    if not fused:
        q, k = q.contiguous(), k.contiguous()
    rows = (len(section),) if section else ()
    positions = torch.randint(0, MAX_POS, (*rows, tokens), device=device)
    wq = torch.randn(d, dtype=wdtype, device=device)
    wk = torch.randn(d, dtype=wdtype, device=device)
    return qkv, q, k, positions, wq, wk, make_cache(rot_dim, device=device)


def _weight_dtypes(dtype):
    return [dtype] if dtype == torch.float32 else [dtype, torch.float32]  # fp32: Qwen3.5's `1 + w`


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("hq,hkv,d,rot_dim,section,interleaved", SHAPES)
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
def test_matches_reference(kernels, device, dtype, hq, hkv, d, rot_dim, section, interleaved, tokens, is_neox,
                           offset):
    for wdtype in _weight_dtypes(dtype):
        qkv, q, k, pos, wq, wk, cache = _inputs(device, dtype, tokens, hq, hkv, d, rot_dim, section, wdtype,
                                                offset=offset)
        v_before = qkv[:, (hq + hkv) * d :].clone()
        q_ref, k_ref = q.clone(), k.clone()
        reference.qk_norm_rope(pos, q_ref, k_ref, wq, wk, EPS, cache, is_neox, section, interleaved)
        kernels.qk_norm_rope(pos, q, k, wq, wk, EPS, cache, is_neox, section, interleaved)
        assert_close(q, q_ref, dtype)
        assert_close(k, k_ref, dtype)
        torch.testing.assert_close(qkv[:, (hq + hkv) * d :], v_before, rtol=0, atol=0)  # v untouched


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_equals_norm_then_rotary(kernels, device, dtype):
    """Contiguous q/k, the kernels' own two ops in a row: the fused op gives the same values."""
    for wdtype in _weight_dtypes(dtype):
        _, q, k, pos, wq, wk, cache = _inputs(device, dtype, 19, 8, 2, 256, 64, [11, 11, 10], wdtype, fused=False)
        q2, k2 = kernels.rms_norm(q, wq, EPS), kernels.rms_norm(k, wk, EPS)
        kernels.rotary_embedding(pos, q2, k2, 256, cache, True, [11, 11, 10], True)
        kernels.qk_norm_rope(pos, q, k, wq, wk, EPS, cache, True, [11, 11, 10], True)
        # One rounding step of the dtype at most (the kernels may sum squares in another order).
        assert_close(q, q2, dtype, scale=0.5)
        assert_close(k, k2, dtype, scale=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(kernels, device):
    _, q, k, pos, wq, wk, cache = _inputs(device, torch.float32, 4, 4, 2, 64, 64, None, torch.float32)
    with raises(device, "same T and D"):
        kernels.qk_norm_rope(pos, q, k[..., :32], wq, wk, EPS, cache, True, None, False)
    with raises(device, "weights must be"):
        kernels.qk_norm_rope(pos, q, k, wq[:32], wk, EPS, cache, True, None, False)
    with raises(device, "cos_sin_cache"):
        kernels.qk_norm_rope(pos, q, k, wq, wk, EPS, cache.double(), True, None, False)
    with raises(device, "rot_dim"):
        kernels.qk_norm_rope(pos, q, k, wq, wk, EPS, make_cache(128, device=device), True, None, False)
    with raises(device, "tokens"):
        kernels.qk_norm_rope(pos[:3], q, k, wq, wk, EPS, cache, True, None, False)
    with raises(device, "mrope_section"):
        kernels.qk_norm_rope(pos.expand(3, -1), q, k, wq, wk, EPS, cache, True, [10, 10, 10], True)
    with raises(device, "dtypes differ"):
        kernels.qk_norm_rope(pos, q.bfloat16(), k.bfloat16(), wq.bfloat16(), wk, EPS, cache, True, None, False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(kernels, device):
    for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        _, q, k, pos, wq, wk, cache = _inputs(device, dtype, 5, 4, 2, 128, 128, [24, 20, 20], wdtype)
        torch.library.opcheck(torch.ops.splitvl.qk_norm_rope.default,
                              (pos, q.contiguous(), k.contiguous(), wq, wk, EPS, cache, True, [24, 20, 20], True))
