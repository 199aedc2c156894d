"""qk_norm_rope_and_cache: the q/k norm + RoPE with the KV-cache write folded in, vs its reference
(qk_norm_rope then reshape_and_cache) and vs the kernels' own two ops in a row."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.common import DEVICE_DTYPES, DEVICES, assert_close, raises
from tests.ops.test_qk_norm_rope import EPS, _weight_dtypes
from tests.ops.test_rotary import MAX_POS, make_cache

BLOCK = 16

# (Hq, Hkv, D, rot_dim, mrope_section, interleaved): Qwen3-VL-30B-A3B (GQA 8, interleaved mRoPE),
# Qwen3.5 (D 256, partial rotary), odd sizes (D 100: no 16-byte packs in bf16/fp16; GQA 3, 5),
# chunked mRoPE and plain RoPE (positions [T]).
SHAPES = [
    pytest.param(32, 4, 128, 128, [24, 20, 20], True, id="30b-a3b"),
    pytest.param(8, 2, 256, 64, [11, 11, 10], True, id="qwen3.5-partial"),
    pytest.param(6, 2, 100, 48, [8, 8, 8], True, id="d100-interleaved"),
    pytest.param(5, 1, 72, 72, [12, 12, 12], False, id="d72-chunked"),
    pytest.param(2, 2, 96, 32, None, False, id="plain-partial"),
]


def _inputs(device, dtype, tokens, hq, hkv, d, rot_dim, section, wdtype, offset=0, num_blocks=6):
    """q, k, v as views of one fused qkv output ([T, (Hq + 2 Hkv) D], `offset` elements before q:
    rows not 16-byte aligned), random caches and slots with padding (-1) tokens."""
    width = (hq + 2 * hkv) * d
    qkv = torch.randn(tokens, width + offset, dtype=dtype, device=device)[:, offset:] * 3
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
    rows = (len(section),) if section else ()
    positions = torch.randint(0, MAX_POS, (*rows, tokens), device=device)
    wq = torch.randn(d, dtype=wdtype, device=device)
    wk = torch.randn(d, dtype=wdtype, device=device)
    caches = [torch.randn(num_blocks, BLOCK, hkv, d, dtype=dtype, device=device) for _ in range(2)]
    slots = torch.randperm(num_blocks * BLOCK, device=device)[:tokens]
    slots[::3] = -1  # padding tokens (CUDA-graph rows, prefix hits) write nothing
    return qkv, q, k, v, positions, wq, wk, make_cache(rot_dim, device=device), caches, slots


def _cached_rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Shapes: cache [num_blocks, BLOCK, Hkv, D], slots [T] -> the rows of the slots >= 0."""
    keep = slots[slots >= 0]
    return cache.flatten(0, 1)[keep]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("hq,hkv,d,rot_dim,section,interleaved", SHAPES)
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
def test_matches_reference(kernels, device, dtype, hq, hkv, d, rot_dim, section, interleaved, tokens, is_neox,
                           offset):
    for wdtype in _weight_dtypes(dtype):
        qkv, q, k, v, pos, wq, wk, cos_sin, (kc, vc), slots = _inputs(
            device, dtype, tokens, hq, hkv, d, rot_dim, section, wdtype, offset)
        v_before = v.clone()
        q_ref, k_ref, kc_ref, vc_ref = q.clone(), k.clone(), kc.clone(), vc.clone()
        reference.qk_norm_rope_and_cache(pos, q_ref, k_ref, v_before, wq, wk, EPS, cos_sin, kc_ref, vc_ref, slots,
                                         is_neox, section, interleaved)
        kernels.qk_norm_rope_and_cache(pos, q, k, v, wq, wk, EPS, cos_sin, kc, vc, slots, is_neox, section,
                                       interleaved)
        assert_close(q, q_ref, dtype)
        assert_close(k, k_ref, dtype)
        assert_close(kc, kc_ref, dtype)  # rows of padding tokens and other slots: exactly as before
        torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)
        torch.testing.assert_close(v, v_before, rtol=0, atol=0)  # v untouched
        # The cache holds exactly the rotated key the op left in place.
        torch.testing.assert_close(_cached_rows(kc, slots), k[slots >= 0], rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens", [1, 19])
def test_equals_qk_norm_rope_then_reshape_and_cache(kernels, device, dtype, tokens):
    """The kernels' own two ops in a row (the no-cache path of the attention layers) give the same values."""
    for wdtype in _weight_dtypes(dtype):
        _, q, k, v, pos, wq, wk, cos_sin, (kc, vc), slots = _inputs(
            device, dtype, tokens, 32, 4, 128, 128, [24, 20, 20], wdtype)
        q2, k2, kc2, vc2 = q.clone(), k.clone(), kc.clone(), vc.clone()
        kernels.qk_norm_rope(pos, q2, k2, wq, wk, EPS, cos_sin, True, [24, 20, 20], True)
        kernels.reshape_and_cache(k2, v, kc2, vc2, slots)
        kernels.qk_norm_rope_and_cache(pos, q, k, v, wq, wk, EPS, cos_sin, kc, vc, slots, True, [24, 20, 20], True)
        for got, want in ((q, q2), (k, k2), (kc, kc2)):
            assert_close(got, want, dtype, scale=0.5)  # one rounding step of the dtype at most
        torch.testing.assert_close(vc, vc2, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(kernels, device):
    _, q, k, v, pos, wq, wk, cos_sin, (kc, vc), slots = _inputs(device, torch.float32, 4, 4, 2, 64, 64, None,
                                                                 torch.float32)

    def call(**changed):
        args = dict(positions=pos, query=q, key=k, value=v, q_weight=wq, k_weight=wk, eps=EPS,
                    cos_sin_cache=cos_sin, key_cache=kc, value_cache=vc, slot_mapping=slots)
        kernels.qk_norm_rope_and_cache(**{**args, **changed})

    with raises(device, "weights must be"):
        call(q_weight=wq[:32])
    with raises(device, "value"):
        call(value=v[:, :1])
    with raises(device, "key_cache"):
        call(key_cache=kc[..., :32])
    with raises(device, "key_cache"):
        call(key_cache=kc[:, :, :1])
    with raises(device, "contiguous"):
        call(value_cache=vc.transpose(0, 1).contiguous().transpose(0, 1))
    with raises(device, "dtypes"):
        call(key_cache=kc.double(), value_cache=vc.double())
    with raises(device, "slot_mapping"):
        call(slot_mapping=slots.int())
    with raises(device, "slot_mapping"):
        call(slot_mapping=slots[:3])
    if device == "cpu":  # bounds are checked on the host only (as reshape_and_cache)
        with raises(device, "outside"):
            call(slot_mapping=torch.full_like(slots, kc.shape[0] * BLOCK))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(kernels, device):
    for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        _, q, k, v, pos, wq, wk, cos_sin, (kc, vc), slots = _inputs(device, dtype, 5, 4, 2, 128, 128, [24, 20, 20],
                                                                     wdtype)
        torch.library.opcheck(
            torch.ops.splitvl.qk_norm_rope_and_cache.default,
            (pos, q.contiguous(), k.contiguous(), v.contiguous(), wq, wk, EPS, cos_sin, kc, vc, slots, True,
             [24, 20, 20], True),
        )
