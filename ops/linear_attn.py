"""Typed wrappers of the Qwen3.5 linear-attention ops (Gated DeltaNet).

Each wrapper allocates its output and calls `torch.ops.splitvl.<op>`; when the
extension is not available (`ops.extension_available()` false, e.g.
`SPLITVL_REFERENCE_OPS=1`), the names are bound to `ops.reference_linear_attn`
instead, exactly as `ops/__init__.py` does for the other ops.

State pools: conv states `[num_slots, dim, width-1]` (x's dtype) and recurrent
states `[num_slots, Hv, Dk, Dv]` (fp32) belong to the engine; sequence `b` of a
batch uses slot `state_indices[b]` (int32). Slots of one batch must be distinct;
a slot < 0 means none (zero start, final state dropped: CUDA-graph padding).
`has_initial_state[b]` false starts sequence `b` from zeros (a new prompt), true
continues from its slot (chunked prefill). See `ops/reference_linear_attn.py`.
"""

from __future__ import annotations

import torch

from ops import extension_available
from ops import reference_linear_attn as reference

__all__ = [
    "causal_conv1d_fwd",
    "causal_conv1d_update",
    "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent",
    "gated_rms_norm",
]


def causal_conv1d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """Depthwise causal conv over packed sequences; writes each final conv state.

    Shapes: x [T, dim] token-major (unit stride along dim, any row stride),
    weight [dim, W], bias [dim] | None, conv_states [num_slots, dim, W-1] (in
    place), cu_seqlens [B+1] int32, state_indices [B] int32,
    has_initial_state [B] bool | None -> out [T, dim].
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.causal_conv1d_fwd.default(
        out, x, weight, bias, conv_states, cu_seqlens, state_indices, has_initial_state, silu
    )
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    state_indices: torch.Tensor,
    silu: bool = True,
) -> torch.Tensor:
    """Decode step: one new token per sequence, conv state shifted in place.

    Shapes: x [B, dim], weight [dim, W], conv_states [num_slots, dim, W-1],
    state_indices [B] int32 -> out [B, dim].
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.causal_conv1d_update.default(
        out, x, weight, bias, conv_states, state_indices, silu
    )
    return out


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor,
    states: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Gated delta rule prefill over packed sequences (chunks of 64), fp32 state.

    Value head h reads query/key head h // (Hv // Hk). q is scaled by Dk^-0.5
    (after the l2 norm when `use_qk_l2norm`).

    Shapes: q, k [T, Hk, Dk], v [T, Hv, Dv] (unit stride along the head dim,
    any token/head strides), g (log decay) and beta [T, Hv], cu_seqlens [B+1]
    int32, states [num_slots, Hv, Dk, Dv] fp32 (in place), state_indices [B]
    int32, has_initial_state [B] bool | None -> out [T, Hv, Dv] in q's dtype.
    """
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    torch.ops.splitvl.gated_delta_rule_chunked.default(
        out, q, k, v, g.float().contiguous(), beta.float().contiguous(), cu_seqlens,
        states, state_indices, has_initial_state, use_qk_l2norm,
    )
    return out


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    state_indices: torch.Tensor,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Gated delta rule decode step: one token per sequence, continuing its slot.

    Shapes: q, k [B, Hk, Dk], v [B, Hv, Dv], g and beta [B, Hv], states
    [num_slots, Hv, Dk, Dv] fp32 (in place), state_indices [B] int32
    -> out [B, Hv, Dv] in q's dtype.
    """
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    torch.ops.splitvl.gated_delta_rule_recurrent.default(
        out, q, k, v, g.float().contiguous(), beta.float().contiguous(), states,
        state_indices, use_qk_l2norm,
    )
    return out


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight * silu(z) (transformers' Qwen3_5RMSNormGated; weight as is).

    Shapes: x, z [..., D] (views with outer strides are fine), weight [D] in x's
    dtype or fp32 -> out [..., D] contiguous in x's dtype.
    """
    d = x.shape[-1]
    x2 = x.reshape(-1, d) if x.stride(-1) == 1 else x.contiguous().view(-1, d)
    z2 = z.reshape(-1, d) if z.stride(-1) == 1 else z.contiguous().view(-1, d)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.gated_rms_norm.default(out.view(-1, d), x2, z2, weight, eps)
    return out


def _register_fakes() -> None:
    """Fake kernels: each op only writes into tensors it is given."""

    def writes_in_place(*args, **kwargs) -> None:
        return None

    for name in __all__:
        torch.library.register_fake(f"splitvl::{name}")(writes_in_place)


if extension_available():
    _register_fakes()
else:
    causal_conv1d_fwd = reference.causal_conv1d_fwd  # noqa: F811
    causal_conv1d_update = reference.causal_conv1d_update  # noqa: F811
    gated_delta_rule_chunked = reference.gated_delta_rule_chunked  # noqa: F811
    gated_delta_rule_recurrent = reference.gated_delta_rule_recurrent  # noqa: F811
    gated_rms_norm = reference.gated_rms_norm  # noqa: F811
