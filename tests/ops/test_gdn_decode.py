"""gated_delta_net_decode: the fused Gated DeltaNet decode step vs its reference (the composition
of the four ops' references) and vs the composition of the four ops' own kernels, over several
steps, with strided projections, shuffled slots, a slot-less sequence, bad input and opcheck."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ops import reference_linear_attn as ref
from tests.ops.common import DEVICE_DTYPES, DEVICES, GPU, assert_close, raises

# (Hk, Hv, Dk, Dv): value heads per key head 2 and 1, Dk != Dv, Dv not a multiple of 4,
# and the 0.8B head shape.
HEADS = [
    pytest.param((2, 4, 16, 40), id="gqa-dk16-dv40"),
    pytest.param((3, 3, 32, 8), id="mha-dk32-dv8"),
    pytest.param((2, 2, 12, 6), id="mha-dv6"),
    pytest.param((2, 2, 128, 128), id="0.8b-heads"),
]
EPS = 1e-6


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer's weights and state pools as the model holds them."""

    conv_weight: torch.Tensor
    conv_states: torch.Tensor
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    recurrent_states: torch.Tensor
    norm_weight: torch.Tensor

    def clone_states(self) -> "Layer":
        return Layer(self.conv_weight, self.conv_states.clone(), self.A_log, self.dt_bias,
                     self.recurrent_states.clone(), self.norm_weight)


def make_layer(heads, width: int, num_slots: int, dtype, device: str, fp32_norm: bool = False) -> Layer:
    hk, hv, dk, dv = heads
    conv_dim = 2 * hk * dk + hv * dv
    return Layer(
        conv_weight=(torch.randn(conv_dim, width) * 0.5).to(dtype).to(device),
        conv_states=torch.randn(num_slots, conv_dim, width - 1).to(dtype).to(device),
        A_log=torch.randn(hv).to(device),
        dt_bias=torch.randn(hv).to(device),
        recurrent_states=(torch.randn(num_slots, hv, dk, dv) * 0.5).to(device),
        norm_weight=(torch.randn(dv) + 1).to(torch.float32 if fp32_norm else dtype).to(device),
    )


def make_proj(batch: int, heads, dtype, device: str) -> torch.Tensor:
    """The in_proj output's columns as a strided view (row stride wider than the row)."""
    hk, hv, dk, dv = heads
    total = 2 * hk * dk + 2 * hv * dv + 2 * hv
    return torch.randn(batch, total + 7, dtype=dtype, device=device)[:, 3 : 3 + total]


def shuffled_slots(batch: int, device: str) -> torch.Tensor:
    """Distinct slots out of order in a pool of batch + 3; no slot (-1) for one sequence when batch > 2."""
    slots = torch.randperm(batch + 3)[:batch].to(torch.int32)
    if batch > 2:
        slots[batch // 2] = -1
    return slots.to(device)


def state_dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    """Tolerance of the fp32 recurrent state: the CUDA conv (fused multiply-adds) may round a q/k
    channel to the neighbouring half-precision value of the CPU reference's, and the state takes
    that channel's difference; on CPU and in fp32 the state matches to fp32 accuracy."""
    return torch.float32 if device == "cpu" or dtype == torch.float32 else dtype


def run(fn, layer: Layer, proj: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return fn(proj, layer.conv_weight, layer.conv_states, layer.A_log, layer.dt_bias, layer.recurrent_states,
              slots, layer.norm_weight, EPS, True)


def composed_kernels(kernels):
    """The decode step as the four ops' kernels compute it, one launch each."""
    def step(proj, conv_weight, conv_states, A_log, dt_bias, recurrent_states, slots, norm_weight, eps, l2norm):
        batch, conv_dim = proj.shape[0], conv_weight.shape[0]
        hv, dv, dk = A_log.shape[0], norm_weight.shape[0], recurrent_states.shape[2]
        key_dim = (conv_dim - hv * dv) // 2
        mixed, z, ba = proj.split([conv_dim, hv * dv, 2 * hv], dim=-1)
        g, beta = kernels.gdn_gating(ba, A_log, dt_bias)
        mixed = kernels.causal_conv1d_update(mixed, conv_weight, None, conv_states, slots, True)
        q, k, v = mixed.split([key_dim, key_dim, hv * dv], dim=-1)
        out = kernels.gated_delta_rule_recurrent(q.view(batch, -1, dk), k.view(batch, -1, dk),
                                                 v.view(batch, hv, dv), g, beta, recurrent_states, slots, l2norm)
        return kernels.gated_rms_norm(out, z.view(batch, hv, dv), norm_weight, eps)
    return step


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("batch", [1, 33])
def test_matches_reference_over_steps(kernels, device, dtype, heads, batch):
    """Three decode steps in a row (the conv window shifts through the state)."""
    layer = make_layer(heads, 4, batch + 3, dtype, device, fp32_norm=batch == 1)
    expected_layer, composed_layer = layer.clone_states(), layer.clone_states()
    slots = shuffled_slots(batch, device)
    for _ in range(3):
        proj = make_proj(batch, heads, dtype, device)
        expected = run(ref.gated_delta_net_decode, expected_layer, proj, slots)
        composed = run(composed_kernels(kernels), composed_layer, proj, slots)
        out = run(kernels.gated_delta_net_decode, layer, proj, slots)
        assert out.shape == (batch, heads[1], heads[3]) and out.dtype == dtype
        assert_close(out, expected, dtype, scale=10)
        assert_close(layer.conv_states, expected_layer.conv_states, dtype)
        assert_close(layer.recurrent_states, expected_layer.recurrent_states, state_dtype(device, dtype), scale=10)
        if device == "cpu":  # the CPU op is the four CPU kernels composed: the same bits
            torch.testing.assert_close(out, composed, rtol=0, atol=0)
            torch.testing.assert_close(layer.recurrent_states, composed_layer.recurrent_states, rtol=0, atol=0)
        else:
            assert_close(out, composed, dtype, scale=10)
        torch.testing.assert_close(layer.conv_states, composed_layer.conv_states, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [2, 3])
def test_other_conv_widths_match_reference(kernels, device, width):
    heads, batch = (2, 4, 16, 40), 5
    layer = make_layer(heads, width, batch + 3, torch.float32, device)
    expected_layer = layer.clone_states()
    slots = shuffled_slots(batch, device)
    proj = make_proj(batch, heads, torch.float32, device)
    expected = run(ref.gated_delta_net_decode, expected_layer, proj, slots)
    assert_close(run(kernels.gated_delta_net_decode, layer, proj, slots), expected, torch.float32, scale=10)
    assert_close(layer.conv_states, expected_layer.conv_states, torch.float32)
    assert_close(layer.recurrent_states, expected_layer.recurrent_states, torch.float32, scale=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [pytest.param((16, 16, 128, 128), id="0.8b"), pytest.param((4, 8, 128, 128), id="gqa")])
@pytest.mark.parametrize("batch", [1, 64])
@GPU
def test_model_shapes_match_reference_on_gpu(kernels, dtype, heads, batch):
    """The decode shapes the engine runs (0.8B, and two value heads per key head), contiguous proj."""
    layer = make_layer(heads, 4, batch + 3, dtype, "cuda")
    expected_layer = layer.clone_states()
    slots = shuffled_slots(batch, "cuda")
    proj = make_proj(batch, heads, dtype, "cuda").contiguous()
    expected = run(ref.gated_delta_net_decode, expected_layer, proj, slots)
    assert_close(run(kernels.gated_delta_net_decode, layer, proj, slots), expected, dtype, scale=10)
    assert_close(layer.conv_states, expected_layer.conv_states, dtype)
    assert_close(layer.recurrent_states, expected_layer.recurrent_states, state_dtype("cuda", dtype), scale=10)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises(kernels, device):
    heads, batch = (2, 4, 16, 8), 3
    layer = make_layer(heads, 4, batch + 3, torch.float32, device)
    proj, slots = make_proj(batch, heads, torch.float32, device), shuffled_slots(batch, device)
    with raises(device, "proj must be"):
        run(kernels.gated_delta_net_decode, layer, proj[:, 1:], slots)
    with raises(device, "conv_dim"):
        kernels.gated_delta_net_decode(proj, layer.conv_weight[1:], layer.conv_states[:, 1:].contiguous(),
                                       layer.A_log, layer.dt_bias, layer.recurrent_states, slots,
                                       layer.norm_weight, EPS, True)
    with raises(device, "recurrent_states must be contiguous float32"):
        kernels.gated_delta_net_decode(proj, layer.conv_weight, layer.conv_states, layer.A_log, layer.dt_bias,
                                       layer.recurrent_states.double(), slots, layer.norm_weight, EPS, True)
    with raises(device, "state_indices must be"):
        run(kernels.gated_delta_net_decode, layer, proj, slots.long())


def test_bad_slots_raise_on_cpu(kernels):
    heads, batch = (2, 4, 16, 8), 3
    layer = make_layer(heads, 4, 5, torch.float32, "cpu")
    proj = make_proj(batch, heads, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="share a state slot"):
        run(kernels.gated_delta_net_decode, layer, proj, torch.tensor([1, 4, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of range for 5 slots"):
        run(kernels.gated_delta_net_decode, layer, proj, torch.tensor([1, 5, 0], dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(kernels, device):
    heads, batch = (2, 4, 16, 8), 3
    layer = make_layer(heads, 4, batch + 3, torch.float32, device)
    proj, slots = make_proj(batch, heads, torch.float32, device), shuffled_slots(batch, device)
    out = torch.empty(batch, heads[1], heads[3], device=device)
    torch.library.opcheck(
        torch.ops.splitvl.gated_delta_net_decode.default,
        (out, proj, layer.conv_weight, layer.conv_states, layer.A_log, layer.dt_bias, layer.recurrent_states,
         slots, layer.norm_weight, EPS, True),
    )
