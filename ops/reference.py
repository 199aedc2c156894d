"""Pure-torch reference semantics of every splitvl op.

These functions are the law the C++/CUDA kernels are tested against
(docs/INTERNALS.md). They favour clarity over speed, but are used for real when
the extension is unavailable or `SPLITVL_REFERENCE_OPS=1`, so they are
vectorised where that stays readable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: fp32 `normed = x * rsqrt(mean(x^2) + eps)`, then

    - weight in x.dtype (Qwen3's `Qwen3RMSNorm`): `normed.to(x.dtype) * weight`;
    - fp32 weight with a bf16/fp16 x (Qwen3.5's `Qwen3_5RMSNorm`, whose `1 + w`
      would lose up to 0.4% per channel in bf16): `(normed * weight).to(x.dtype)`,
      one rounding.
    The two agree for fp32 x.

    Shapes: x [..., D] (the kernels need unit last stride; any outer strides), weight [D]
    -> [..., D] contiguous, x.dtype.
    """
    _check_norm_args(x, weight)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == x.dtype:
        return (normed.to(x.dtype) * weight).contiguous()
    return (normed * weight).to(x.dtype).contiguous()


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: `residual = x + residual` (rounded to dtype), `x = rms_norm(residual)`.

    Shapes: x [..., D], residual same shape and dtype, weight [D] in x.dtype or fp32.
    """
    _check_norm_args(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"fused_add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
            f"input {tuple(x.shape)} {x.dtype}"
        )
    residual.copy_(x + residual)
    x.copy_(rms_norm(residual, weight, eps))


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight {tuple(weight.shape)} must be [D] with D = input.shape[-1] "
            f"(input {tuple(x.shape)})"
        )
    if weight.dtype not in (x.dtype, torch.float32) or not x.is_floating_point():
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} must be float32 or the input dtype {x.dtype}")


def mrope_rows(
    rot_half: int, mrope_section: Sequence[int], interleaved: bool
) -> list[int]:
    """Which row of sectioned positions `[S, T]` each of the `rot_half` frequencies uses."""
    sections = list(mrope_section)
    if sum(sections) != rot_half:
        raise ValueError(
            f"rotary_embedding: sum(mrope_section)={sum(sections)} must equal rot_dim/2={rot_half}"
        )
    if not interleaved:
        return [s for s, n in enumerate(sections) for _ in range(n)]
    if len(sections) != 3:
        raise ValueError("rotary_embedding: interleaved mrope needs exactly 3 sections")
    rows = []
    for i in range(rot_half):
        if i % 3 == 1 and i < 3 * sections[1]:
            rows.append(1)
        elif i % 3 == 2 and i < 3 * sections[2]:
            rows.append(2)
        else:
            rows.append(0)
    return rows


def rotary_cos_sin(
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos and sin, each [T, rot_dim/2] fp32.

    Shapes: positions [T] or [S, T]; cos_sin_cache [max_pos, rot_dim].
    """
    rot_half = cos_sin_cache.shape[-1] // 2
    cache = cos_sin_cache.float()
    if not mrope_section:
        if positions.dim() != 1:
            raise ValueError(f"rotary_embedding: plain RoPE needs positions [T], got {tuple(positions.shape)}")
        cs = cache[positions.long()]
        return cs[:, :rot_half], cs[:, rot_half:]
    if positions.dim() != 2 or positions.shape[0] != len(mrope_section):
        raise ValueError(
            f"rotary_embedding: sectioned RoPE needs positions [{len(mrope_section)}, T], "
            f"got {tuple(positions.shape)}"
        )
    rows = torch.tensor(mrope_rows(rot_half, mrope_section, mrope_interleaved), device=positions.device)
    cs = cache[positions.long()]  # [S, T, rot_dim]
    index = torch.cat([rows, rows])[None, None, :].expand(1, cs.shape[1], -1)
    cs = cs.gather(0, index).squeeze(0)  # [T, rot_dim]
    return cs[:, :rot_half], cs[:, rot_half:]


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int, is_neox: bool) -> None:
    """Rotate x [T, H, D] in place over its first rot_dim dims; cos/sin [T, rot_dim/2]."""
    rot = x[..., :rot_dim]
    xf = rot.float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    rot.copy_(out.to(x.dtype))


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
    """Neox (or GPT-J when not is_neox) RoPE in place on query and key; mRoPE with mrope_section.

    Shapes: positions [T] or [S, T]; query [T, Hq*D] or [T, Hq, D] (may be
    strided views); key likewise or None; cos_sin_cache [max_pos, rot_dim] fp32.
    """
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 or rot_dim > head_size:
        raise ValueError(f"rotary_embedding: rot_dim {rot_dim} must be even and <= head_size {head_size}")
    cos, sin = rotary_cos_sin(positions, cos_sin_cache, mrope_section, mrope_interleaved)
    for x in (query, key):
        if x is None:
            continue
        heads = x if x.dim() == 3 else x.unflatten(-1, (-1, head_size))
        if heads.shape[-1] != head_size or heads.shape[0] != cos.shape[0]:
            raise ValueError(
                f"rotary_embedding: tensor {tuple(x.shape)} is not [T, H*{head_size}] or "
                f"[T, H, {head_size}] with T={cos.shape[0]}"
            )
        _rotate_(heads, cos, sin, rot_dim, is_neox)


def qk_norm_rope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> None:
    """In place: `query = rope(rms_norm(query, q_weight))`, `key = rope(rms_norm(key, k_weight))`.

    The per-head q/k norm of Qwen3 / Qwen3.5 attention and the rotary embedding in one op:
    the same numbers as `rms_norm` (each head's D values; weight in the input dtype or fp32)
    then `rotary_embedding` on the rounded result.

    Shapes: positions [T] or [S, T]; query [T, Hq, D], key [T, Hkv, D] (strided views of a
    fused qkv output allowed; unit last stride); q_weight / k_weight [D];
    cos_sin_cache [max_pos, rot_dim] fp32.
    """
    if query.dim() != 3 or key.dim() != 3 or key.shape[-1] != query.shape[-1]:
        raise ValueError(f"qk_norm_rope: query {tuple(query.shape)} and key {tuple(key.shape)} must be "
                         "[T, H, D] with the same D")
    query.copy_(rms_norm(query, q_weight, eps))
    key.copy_(rms_norm(key, k_weight, eps))
    rotary_embedding(positions, query, key, query.shape[-1], cos_sin_cache, is_neox, mrope_section,
                     mrope_interleaved)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Shapes: x [..., 2d] -> [..., d] = silu(x[..., :d]) * x[..., d:] (fp32 math)."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def linear_small(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Shapes: x [M, K], weight [N, K], bias [N] | None -> [M, N] = x weight^T + bias (fp32 math).

    Any M is correct; the CUDA kernel is built for M <= 16 (decode), where it reads the
    weight once at near copy speed. Its fast path takes bf16/fp16 with K % 8 == 0, unit
    column stride and 16-byte aligned rows of x and a contiguous weight; other inputs
    (fp32 included) take an ATen matmul with the same result.
    """
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)



def add_rms_norm_linear_small(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rms_norm` then `linear_small`, out of place: returns
    `(linear_small(rms_norm(x + residual), weight, bias), x + residual)` with every rounding of
    the two ops called in turn (the sum rounded to the dtype, the norm's rule for `norm_weight`,
    the linear in fp32 rounded once). x and residual are left as they were.

    A pre-norm block's input norm and first projection at decode: the CUDA kernel is one
    weight-streaming launch for bf16/fp16 (same fast path as `linear_small`, plus a residual
    with unit last stride and 16-byte aligned rows); other inputs run the two ops.

    Shapes: x [M, K] (unit last stride), residual [M, K] same dtype, norm_weight [K] in x's
    dtype or fp32, weight [N, K], bias [N] | None -> ([M, N], [M, K] contiguous).
    """
    if x.dim() != 2 or residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"add_rms_norm_linear_small: x must be [M, K] with residual of its shape and dtype, got "
            f"{tuple(x.shape)} {x.dtype} and {tuple(residual.shape)} {residual.dtype}"
        )
    new_residual = (x + residual).contiguous()
    return linear_small(rms_norm(new_residual, norm_weight, eps), weight, bias), new_residual

def gate_up_silu_small(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Shapes: x [M, K], weight [2I, K] (I gate rows, then I up rows) -> [M, I]
    = silu(x W_gate^T) * (x W_up^T) (fp32 math): a SwiGLU gate_up projection with its
    activation; sizes and fast path as `linear_small`.
    """
    return silu_and_mul(F.linear(x.float(), weight.float())).to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Shapes: x [...] -> same; gelu with the tanh approximation (fp32 math)."""
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


def sigmoid_gate_mul(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`x * sigmoid(gate)` in x's dtype, as transformers' Qwen3.5 attention computes it: the
    sigmoid rounded to the dtype, then the product (fp32 math for each).

    Shapes: x [..., D], gate [..., D] (same shape and dtype; unit last stride, any outer
    strides: the gate is a view of the fused q projection) -> [..., D] contiguous.
    """
    if x.shape != gate.shape or x.dtype != gate.dtype:
        raise ValueError(f"sigmoid_gate_mul: gate {tuple(gate.shape)} {gate.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    math = torch.promote_types(x.dtype, torch.float32)
    s = torch.sigmoid(gate.to(math)).to(x.dtype)
    return (x.to(math) * s.to(math)).to(x.dtype).contiguous()


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token t's K/V at slot `slot_mapping[t]` of the paged caches; slot < 0 skipped.

    Shapes: key/value [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D];
    slot_mapping [T] int64.
    """
    if key_cache.dtype != key.dtype or value_cache.dtype != value.dtype:
        raise ValueError(f"reshape_and_cache: cache dtype {key_cache.dtype} != key dtype {key.dtype}")
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep]
    value_cache[blocks, offsets] = value[keep]


def qk_norm_rope_and_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    is_neox: bool = True,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
) -> None:
    """`qk_norm_rope` in place on query and key, then `reshape_and_cache` of that key and `value`.

    The attention layers' per-head q/k norm, RoPE and KV-cache write in one op: query and key
    are normalized and rotated exactly as `qk_norm_rope` does, and the rotated key and the
    untouched value of token t go to slot `slot_mapping[t]` of the caches (slot < 0 skipped).

    Shapes: positions [T] or [S, T]; query [T, Hq, D], key / value [T, Hkv, D] (strided views
    of a fused qkv output allowed; unit last stride); q_weight / k_weight [D];
    cos_sin_cache [max_pos, rot_dim] fp32; key_cache / value_cache [num_blocks, block_size,
    Hkv, D] in key's dtype; slot_mapping [T] int64.
    """
    qk_norm_rope(positions, query, key, q_weight, k_weight, eps, cos_sin_cache, is_neox, mrope_section,
                 mrope_interleaved)
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def gather_paged(
    cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> torch.Tensor:
    """First `length` tokens of one sequence's paged cache -> [length, Hkv, D]."""
    block_size = cache.shape[1]
    idx = torch.arange(length, device=cache.device)
    blocks = block_table[idx // block_size].long()
    return cache[blocks, idx % block_size]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> torch.Tensor:
    """One sequence: q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D] in q.dtype.

    GQA by Hq // Hkv; causal masks are bottom-right aligned; a query row that sees
    no key yields zeros.
    """
    lq, hq, _ = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    if hq % hkv:
        raise ValueError(f"attention: query heads {hq} not a multiple of kv heads {hkv}")
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (lk - lq), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its first seq_lens[b] cached tokens.

    Shapes: query [B, Hq, D]; caches [num_blocks, block_size, Hkv, D];
    block_tables [B, max_blocks] int32; seq_lens [B] int32 -> [B, Hq, D].
    """
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    for b, length in enumerate(seq_lens.tolist()):
        k = gather_paged(key_cache, block_tables[b], length)
        v = gather_paged(value_cache, block_tables[b], length)
        out[b] = attend(query[b : b + 1], k, v, scale, causal=False)[0]
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
    """Attention over packed sequences; keys packed or read from the paged cache.

    Shapes: query [Tq, Hq, D]; key/value [Tk, Hkv, D] or None (then key_cache,
    value_cache [num_blocks, block_size, Hkv, D] and block_tables [B, max_blocks]);
    cu_seqlens_q/k [B+1] int32 -> [Tq, Hq, D].
    """
    paged = block_tables is not None
    if paged == (key is not None):
        raise ValueError("varlen_attention: pass either key/value or key_cache/value_cache/block_tables")
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q = query[cu_q[b] : cu_q[b + 1]]
        if paged:
            length = cu_k[b + 1] - cu_k[b]
            k = gather_paged(key_cache, block_tables[b], length)
            v = gather_paged(value_cache, block_tables[b], length)
        else:
            k, v = key[cu_k[b] : cu_k[b + 1]], value[cu_k[b] : cu_k[b + 1]]
        out[cu_q[b] : cu_q[b + 1]] = attend(q, k, v, scale, causal)
    return out


def topk_softmax(
    gating_output: torch.Tensor, topk: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: fp32 softmax over experts, top-k (ties: lower index first).

    Shapes: gating_output [T, E] -> (weights fp32 [T, k], ids int32 [T, k]).
    """
    probs = torch.softmax(gating_output.float(), dim=-1)
    # A stable descending sort keeps equal probabilities in index order.
    weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = weights[:, :topk].contiguous(), ids[:, :topk]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32).contiguous()
