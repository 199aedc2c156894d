"""splitvl custom ops: typed wrappers over `torch.ops.splitvl` (docs/INTERNALS.md).

On import the C++/CUDA extension is built (or loaded from its cache) by
`ops.build`. If that fails, one warning names the cause and every wrapper runs
the pure-torch reference in `ops.reference` instead. `SPLITVL_REFERENCE_OPS=1`
skips the build and uses the references directly.

The wrappers run in every layer of every step, so they only allocate outputs
and call the op.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ops import reference

__all__ = [
    "extension_available",
    "fallback_reason",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_tanh",
    "reshape_and_cache",
    "paged_attention_decode",
    "varlen_attention",
    "topk_softmax",
]


@dataclass(frozen=True, slots=True)
class ExtensionState:
    available: bool
    reason: str | None  # why the references are used, when they are


def _load() -> ExtensionState:
    if os.environ.get("SPLITVL_REFERENCE_OPS", "") not in ("", "0"):
        return ExtensionState(False, "SPLITVL_REFERENCE_OPS is set")
    from ops.build import load_extension

    try:
        load_extension()
    except Exception as exc:  # any build/load failure falls back to the references
        reason = f"{type(exc).__name__}: {exc}"
        short = reason if len(reason) < 3000 else reason[:1000] + "\n...\n" + reason[-2000:]
        warnings.warn(
            f"splitvl ops extension unavailable, using pure-torch references ({short})",
            RuntimeWarning,
            stacklevel=3,
        )
        return ExtensionState(False, reason)
    return ExtensionState(True, None)


_STATE = _load()


def extension_available() -> bool:
    """True when the wrappers run the compiled kernels."""
    return _STATE.available


def fallback_reason() -> str | None:
    """Why the references are in use (None when the extension is loaded)."""
    return _STATE.reason


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Shapes: x [..., D] (unit last stride, any outer strides), weight [D] -> [..., D]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.rms_norm.default(out, x, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual += x; x = rms_norm(residual). Shapes: x, residual [..., D]."""
    torch.ops.splitvl.fused_add_rms_norm.default(x, residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> None:
    """RoPE / mRoPE in place. Shapes: positions [T] or [S, T]; query [T, Hq*D] or
    [T, Hq, D]; key likewise or None; cos_sin_cache [max_pos, rot_dim] fp32."""
    torch.ops.splitvl.rotary_embedding.default(
        positions, query, key, head_size, cos_sin_cache, is_neox,
        list(mrope_section) if mrope_section else [], mrope_interleaved,
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Shapes: x [..., 2d] -> [..., d]."""
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    torch.ops.splitvl.silu_and_mul.default(out, x)
    return out


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Shapes: x [...] -> same (tanh-approximated gelu)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.splitvl.gelu_tanh.default(out, x)
    return out


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Shapes: key/value [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]; slot_mapping [T] int64."""
    torch.ops.splitvl.reshape_and_cache.default(key, value, key_cache, value_cache, slot_mapping)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Shapes: query [B, Hq, D]; caches [num_blocks, block_size, Hkv, D];
    block_tables [B, max_blocks] int32; seq_lens [B] int32 -> [B, Hq, D]."""
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.splitvl.paged_attention_decode.default(
        out, query, key_cache, value_cache, block_tables, seq_lens, scale
    )
    return out


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    key_cache: torch.Tensor | None = None,
    value_cache: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shapes: query [Tq, Hq, D]; key/value [Tk, Hkv, D] or None with the paged
    caches and block_tables [B, max_blocks]; cu_seqlens_q/k [B+1] int32 -> [Tq, Hq, D]."""
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.splitvl.varlen_attention.default(
        out, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, causal, key_cache, value_cache, block_tables,
    )
    return out


def topk_softmax(
    gating_output: torch.Tensor, topk: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes: gating_output [T, E] -> (weights fp32 [T, k], ids int32 [T, k])."""
    tokens = gating_output.shape[0]
    weights = torch.empty((tokens, topk), dtype=torch.float32, device=gating_output.device)
    ids = torch.empty((tokens, topk), dtype=torch.int32, device=gating_output.device)
    torch.ops.splitvl.topk_softmax.default(weights, ids, gating_output, renormalize)
    return weights, ids


def _register_fakes() -> None:
    """Fake kernels: every op only writes into tensors it is given, so they return None."""
    names = (
        "rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "gelu_tanh",
        "reshape_and_cache", "paged_attention_decode", "varlen_attention", "topk_softmax",
    )

    def writes_in_place(*args, **kwargs) -> None:
        return None

    for name in names:
        torch.library.register_fake(f"splitvl::{name}")(writes_in_place)


if _STATE.available:
    _register_fakes()
else:
    rms_norm = reference.rms_norm  # noqa: F811
    fused_add_rms_norm = reference.fused_add_rms_norm  # noqa: F811
    rotary_embedding = reference.rotary_embedding  # noqa: F811
    silu_and_mul = reference.silu_and_mul  # noqa: F811
    gelu_tanh = reference.gelu_tanh  # noqa: F811
    reshape_and_cache = reference.reshape_and_cache  # noqa: F811
    paged_attention_decode = reference.paged_attention_decode  # noqa: F811
    varlen_attention = reference.varlen_attention  # noqa: F811
    topk_softmax = reference.topk_softmax  # noqa: F811

# The Qwen3.5 linear-attention ops (ops/linear_attn.py read `extension_available`
# above, so they are imported last).
from ops.linear_attn import (  # noqa: E402
    causal_conv1d_fwd,
    causal_conv1d_update,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    gated_rms_norm,
)

__all__ += [
    "causal_conv1d_fwd",
    "causal_conv1d_update",
    "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent",
    "gated_rms_norm",
]
