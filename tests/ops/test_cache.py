"""reshape_and_cache: kernels vs reference, reference vs a token-by-token copy."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.common import raises, DEVICE_DTYPES, DEVICES

BLOCK = 16


def _caches(num_blocks, hkv, d, dtype, device):
    shape = (num_blocks, BLOCK, hkv, d)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_reshape_and_cache(kernels, device, dtype, tokens, head_size):
    hkv, num_blocks = 2, 8
    # Strided key/value: slices of a fused [T, (Hq + 2 Hkv) * D] projection.
    qkv = torch.randn(tokens, (4 + 2 * hkv) * head_size, dtype=dtype, device=device)
    k = qkv[:, 4 * head_size : (4 + hkv) * head_size].view(tokens, hkv, head_size)
    v = qkv[:, (4 + hkv) * head_size :].view(tokens, hkv, head_size)
    slots = torch.randperm(num_blocks * BLOCK, device=device)[:tokens]
    if tokens > 2:
        slots[1] = -1  # padding tokens are skipped
    kc, vc = _caches(num_blocks, hkv, head_size, dtype, device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.reshape_and_cache(k, v, kc_ref, vc_ref, slots)
    kernels.reshape_and_cache(k, v, kc, vc, slots)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)


def test_reference_matches_token_by_token_copy():
    tokens, hkv, d = 20, 2, 8
    k, v = torch.randn(tokens, hkv, d), torch.randn(tokens, hkv, d)
    kc, vc = _caches(4, hkv, d, torch.float32, "cpu")
    slots = torch.randperm(4 * BLOCK)[:tokens]
    slots[3] = -1
    kc_exp, vc_exp = kc.clone(), vc.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            kc_exp[slot // BLOCK, slot % BLOCK] = k[t]
            vc_exp[slot // BLOCK, slot % BLOCK] = v[t]
    reference.reshape_and_cache(k, v, kc, vc, slots)
    torch.testing.assert_close(kc, kc_exp, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc_exp, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_rejects_bad_input(kernels, device):
    k = torch.randn(3, 2, 64, device=device)
    kc, vc = _caches(2, 2, 64, torch.float32, device)
    with raises(device, "slot_mapping"):
        kernels.reshape_and_cache(k, k, kc, vc, torch.zeros(3, dtype=torch.int32, device=device))
    with raises(device, "key_cache"):
        kernels.reshape_and_cache(k, k, kc[..., :32], vc, torch.zeros(3, dtype=torch.long, device=device))
    if device == "cpu":  # bounds are checked on the host only
        with raises(device, "outside"):
            kernels.reshape_and_cache(k, k, kc, vc, torch.full((3,), 2 * BLOCK, dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_opcheck(kernels, device):
    k, v = torch.randn(5, 2, 64, device=device), torch.randn(5, 2, 64, device=device)
    kc, vc = _caches(2, 2, 64, torch.float32, device)
    slots = torch.tensor([0, 3, -1, 17, 30], device=device)
    torch.library.opcheck(torch.ops.splitvl.reshape_and_cache.default, (k, v, kc, vc, slots))
