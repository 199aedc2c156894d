"""gdn_gating: kernels vs reference, reference vs the per-element formula of transformers'
Qwen3_5GatedDeltaNet (`beta = b.sigmoid()`, `g = -A_log.exp() * softplus(a + dt_bias)`)."""

from __future__ import annotations

import math

import pytest
import torch

from ops import reference_linear_attn as ref
from tests.ops.common import DEVICE_DTYPES, DEVICES, assert_close, raises, tol


def _inputs(tokens: int, hv: int, dtype: torch.dtype, device: str, pad: int = 0):
    """ba as a [T, 2 * Hv] buffer (or a column slice of a wider one when pad > 0, as in_proj's b, a),
    with a + dt_bias on both sides of softplus' threshold (20)."""
    buf = torch.randn(tokens, 2 * hv + 2 * pad, device=device) * 4
    buf[:, pad + hv : pad + hv + max(hv // 4, 1)] += 24  # a + dt_bias > 20: softplus is linear there
    ba = buf.to(dtype)[:, pad : pad + 2 * hv]
    A_log = torch.log(torch.empty(hv, device=device).uniform_(0.5, 16))  # as transformers initializes it
    dt_bias = torch.randn(hv, device=device)
    return ba, A_log, dt_bias


@pytest.mark.parametrize("device,dtype", [*DEVICE_DTYPES, pytest.param("cpu", torch.float16, id="cpu-fp16")])
@pytest.mark.parametrize("tokens,hv,pad", [(0, 16, 0), (1, 16, 0), (64, 16, 0), (7, 5, 3), (300, 48, 8)])
def test_gdn_gating_matches_reference(kernels, device, dtype, tokens, hv, pad):
    ba, A_log, dt_bias = _inputs(tokens, hv, dtype, device, pad)
    assert pad == 0 or not ba.is_contiguous()
    g, beta = kernels.gdn_gating(ba, A_log, dt_bias)
    g_ref, beta_ref = ref.gdn_gating(ba, A_log, dt_bias)
    for got in (g, beta):
        assert got.shape == (tokens, hv) and got.dtype == torch.float32 and got.is_contiguous()
    assert_close(g, g_ref, torch.float32, scale=4)
    # beta carries ba's rounding: equal up to one rounding step of that dtype.
    assert_close(beta, beta_ref, dtype)
    torch.testing.assert_close(beta.to(dtype).float().cpu(), beta.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_the_per_element_formula(dtype):
    ba, A_log, dt_bias = _inputs(6, 8, dtype, "cpu")
    g, beta = ref.gdn_gating(ba, A_log, dt_bias)
    for t in range(6):
        for h in range(8):
            b, a = float(ba[t, h]), float(ba[t, 8 + h])
            x = a + float(dt_bias[h])
            softplus = x if x > 20 else math.log1p(math.exp(x))
            expected_g = -math.exp(float(A_log[h])) * softplus
            expected_beta = float(torch.tensor(1 / (1 + math.exp(-b))).to(dtype))
            assert g[t, h].item() == pytest.approx(expected_g, rel=1e-5, abs=1e-6)
            assert beta[t, h].item() == pytest.approx(expected_beta, **{"rel": tol(dtype)["rtol"]})


@pytest.mark.parametrize("device", DEVICES)
def test_gdn_gating_rejects_bad_input(kernels, device):
    ba, A_log, dt_bias = _inputs(4, 16, torch.bfloat16, device)
    with raises(device, "ba must be"):
        kernels.gdn_gating(ba[:, :30], A_log, dt_bias)
    with raises(device, "unit stride"):
        kernels.gdn_gating(torch.randn(32, 4, device=device).t(), A_log, dt_bias)
    with raises(device, "float32"):
        kernels.gdn_gating(ba, A_log.bfloat16(), dt_bias)
    with raises(device, "float32"):
        kernels.gdn_gating(ba, A_log, dt_bias[:8])


@pytest.mark.parametrize("device", DEVICES)
def test_gdn_gating_opcheck(kernels, device):
    ba, A_log, dt_bias = _inputs(5, 16, torch.bfloat16, device, pad=2)
    g, beta = torch.empty(5, 16, device=device), torch.empty(5, 16, device=device)
    torch.library.opcheck(torch.ops.splitvl.gdn_gating.default, (g, beta, ba, A_log, dt_bias))
