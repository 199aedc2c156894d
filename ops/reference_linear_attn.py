"""Pure-torch reference semantics of the Qwen3.5 linear-attention ops.

These are the law for the kernels in `ops/csrc/{cpu,cuda}/linear_attn*` and the
fallback when the extension is not built. The math follows transformers'
`modeling_qwen3_5.py` (`causal_conv1d_update`, `torch_chunk_gated_delta_rule`,
`torch_recurrent_gated_delta_rule`, `Qwen3_5RMSNormGated`), re-expressed over
packed variable-length sequences whose states live in a slot pool.

Conventions shared by every op here:
- Packed tokens: sequence `b` owns rows `cu_seqlens[b]:cu_seqlens[b+1]`.
- States live in a pool `[num_slots, ...]`; sequence `b` uses slot
  `state_indices[b]`. A slot < 0 means "no slot" (e.g. CUDA-graph padding): the
  sequence starts from a zero state and its final state is discarded.
- `has_initial_state[b]` false starts sequence `b` from a zero state whatever
  its slot holds (the tensor None: every sequence continues from its slot); the
  final state is written either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
L2NORM_EPS = 1e-6


def _starts_from_state(b: int, slot: int, has_initial_state: torch.Tensor | None) -> bool:
    return slot >= 0 and (has_initial_state is None or bool(has_initial_state[b]))


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

    Shapes: x [T, dim] (token-major, unit stride along dim, any row stride), weight [dim, W],
    bias [dim] | None, conv_states [num_slots, dim, W-1] (the last W-1 inputs of
    each sequence, oldest first; updated in place), cu_seqlens [B+1] int32,
    state_indices [B] int32, has_initial_state [B] bool | None -> out [T, dim].
    """
    dim, width = weight.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cu = cu_seqlens.tolist()
    slots = state_indices.tolist()
    for b, slot in enumerate(slots):
        start, end = cu[b], cu[b + 1]
        if _starts_from_state(b, slot, has_initial_state):
            init = conv_states[slot].to(x.dtype)
        else:
            init = x.new_zeros(dim, width - 1)
        # As transformers' cache path: prepend the cached inputs, then a valid conv.
        window = torch.cat([init, x[start:end].transpose(0, 1)], dim=-1)
        if end > start:
            y = F.conv1d(window.to(weight.dtype)[None], weight[:, None, :], bias, groups=dim)[0]
            if silu:
                y = F.silu(y)
            out[start:end] = y.to(x.dtype).transpose(0, 1)
        if slot >= 0:
            conv_states[slot] = window[:, window.shape[-1] - (width - 1) :].to(conv_states.dtype)
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    state_indices: torch.Tensor,
    silu: bool = True,
) -> torch.Tensor:
    """One decode step of the causal conv: one new token per sequence.

    Shapes: x [B, dim], weight [dim, W], conv_states [num_slots, dim, W-1]
    (updated in place), state_indices [B] int32 -> out [B, dim].
    """
    batch = x.shape[0]
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=x.device)
    return causal_conv1d_fwd(x, weight, bias, conv_states, cu_seqlens, state_indices, None, silu)


def _prepare_qk(
    q: torch.Tensor, k: torch.Tensor, num_v_heads: int, use_qk_l2norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32, heads repeated for the value heads, optionally l2-normalized, q scaled.

    Shapes: q, k [L, Hk, Dk] -> [L, Hv, Dk] each.
    """
    rep = num_v_heads // k.shape[1]
    q = q.float().repeat_interleave(rep, dim=1)
    k = k.float().repeat_interleave(rep, dim=1)
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2NORM_EPS)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2NORM_EPS)
    return q * q.shape[-1] ** -0.5, k


def _chunk_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the gated delta rule in its UT-transform form, all heads at once.

    Shapes: q, k [H, C, Dk] (q already scaled), v [H, C, Dv], g, beta [H, C],
    state [H, Dk, Dv] -> (out [H, C, Dv], new state [H, Dk, Dv]); all fp32.
    """
    c = q.shape[1]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    cum = g.cumsum(-1)
    decay = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    ut_system = (k_beta @ k.transpose(-1, -2)) * decay
    new_values = torch.linalg.solve_triangular(ut_system, v * beta[..., None], upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(
        ut_system, k_beta * cum.exp()[..., None], upper=False, unitriangular=True
    )
    intra = (q @ k.transpose(-1, -2)) * decay
    v_new = new_values - k_cumdecay @ state
    out = (q * cum.exp()[..., None]) @ state + intra @ v_new
    key_decay = (cum[:, -1:] - cum).exp()[..., None]
    state = state * cum[:, -1].exp()[:, None, None] + (k * key_decay).transpose(-1, -2) @ v_new
    return out, state


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
    """Gated delta rule prefill over packed sequences, chunk size 64.

    Per token: S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q / sqrt(Dk),
    computed chunk by chunk as transformers' `torch_chunk_gated_delta_rule`.
    Query/key head `h // (Hv // Hk)` serves value head `h`; q and k are
    l2-normalized first when `use_qk_l2norm`.

    Shapes: q, k [T, Hk, Dk], v [T, Hv, Dv] (unit stride along the head dim, any
    token/head strides), g (log decay, <= 0), beta [T, Hv],
    cu_seqlens [B+1] int32, states [num_slots, Hv, Dk, Dv] fp32 (updated in
    place), state_indices [B] int32, has_initial_state [B] bool | None
    -> out [T, Hv, Dv] in q's dtype.
    """
    num_v_heads, head_k, head_v = v.shape[1], k.shape[2], v.shape[2]
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(state_indices.tolist()):
        start, end = cu[b], cu[b + 1]
        if _starts_from_state(b, slot, has_initial_state):
            state = states[slot].float().clone()
        else:
            state = q.new_zeros(num_v_heads, head_k, head_v, dtype=torch.float32)
        qs, ks = _prepare_qk(q[start:end], k[start:end], num_v_heads, use_qk_l2norm)
        vs, gs, bs = v[start:end].float(), g[start:end].float(), beta[start:end].float()
        for c0 in range(0, end - start, CHUNK_SIZE):
            c1 = min(c0 + CHUNK_SIZE, end - start)
            o, state = _chunk_step(
                qs[c0:c1].transpose(0, 1),
                ks[c0:c1].transpose(0, 1),
                vs[c0:c1].transpose(0, 1),
                gs[c0:c1].transpose(0, 1),
                bs[c0:c1].transpose(0, 1),
                state,
            )
            out[start + c0 : start + c1] = o.transpose(0, 1).to(out.dtype)
        if slot >= 0:
            states[slot] = state
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
    """One decode step of the gated delta rule: one token per sequence, from its slot.

    Shapes: q, k [B, Hk, Dk], v [B, Hv, Dv], g, beta [B, Hv], states
    [num_slots, Hv, Dk, Dv] fp32 (updated in place), state_indices [B] int32
    -> out [B, Hv, Dv] in q's dtype.
    """
    batch, num_v_heads, head_v = v.shape
    slots = state_indices.long()
    valid = slots >= 0
    state = torch.zeros(batch, num_v_heads, k.shape[2], head_v, dtype=torch.float32, device=q.device)
    state[valid] = states[slots[valid]].float()
    qs, ks = _prepare_qk(q, k, num_v_heads, use_qk_l2norm)
    state = state * g.float().exp()[..., None, None]
    kv_mem = (state * ks[..., None]).sum(-2)
    delta = (v.float() - kv_mem) * beta.float()[..., None]
    state = state + ks[..., None] * delta[..., None, :]
    out = (state * qs[..., None]).sum(-2)
    states[slots[valid]] = state[valid]
    return out.to(q.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight * silu(z), as transformers' `Qwen3_5RMSNormGated`.

    The weight is used as is (initialized to ones; no `1 + weight`). Order of
    casts: normalize in fp32, round to x's dtype, multiply by the weight (in the
    promoted dtype), multiply by fp32 silu(z), round to x's dtype.

    Shapes: x, z [..., D] (views with outer strides are fine), weight [D] in x's
    dtype or fp32 -> out [..., D] contiguous, x's dtype.
    """
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dtype)
    return (h * F.silu(z.float())).to(dtype).contiguous()


def gdn_gating(
    ba: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head decay and write strength of the gated delta rule, as transformers'
    `Qwen3_5GatedDeltaNet` computes them from the `b` and `a` projections:
    `g = -exp(A_log) * softplus(a + dt_bias)` in fp32 (softplus threshold 20) and
    `beta = sigmoid(b)` in fp32, rounded to ba's dtype (then widened back to fp32,
    the dtype the delta-rule ops read).

    Shapes: ba [T, 2 * Hv] (b then a; unit stride along the last dim), A_log and
    dt_bias [Hv] fp32 -> (g [T, Hv] fp32, beta [T, Hv] fp32), both contiguous.
    """
    hv = A_log.shape[0]
    if ba.dim() != 2 or ba.shape[1] != 2 * hv or dt_bias.shape != A_log.shape:
        raise ValueError(f"gdn_gating: ba {tuple(ba.shape)} must be [T, 2 * Hv] with Hv = {hv} "
                         f"(A_log {tuple(A_log.shape)}, dt_bias {tuple(dt_bias.shape)})")
    if A_log.dtype != torch.float32 or dt_bias.dtype != torch.float32:
        raise ValueError(f"gdn_gating: A_log and dt_bias must be float32, got {A_log.dtype}, {dt_bias.dtype}")
    b, a = ba.split(hv, dim=-1)
    beta = b.sigmoid().float()
    g = -A_log.exp() * F.softplus(a.float() + dt_bias)
    return g.contiguous(), beta.contiguous()


def gated_delta_net_decode(
    proj: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_states: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    recurrent_states: torch.Tensor,
    state_indices: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """One decode step of a Gated DeltaNet layer between its two projections: one token per
    sequence, continuing its slot. Exactly the composition `gdn_gating` -> `causal_conv1d_update`
    (no bias, SiLU) -> `gated_delta_rule_recurrent` -> `gated_rms_norm` over the columns of the
    input projection, with each op's rounding.

    The head counts follow from the shapes: Hv = len(A_log), Dv = len(norm_weight),
    Dk = recurrent_states.shape[2], Hk = (conv_dim - Hv Dv) / (2 Dk).

    Shapes: proj [B, conv_dim + Hv Dv + 2 Hv] (columns q | k | v | z | b | a, unit column
    stride, any row stride), conv_weight [conv_dim, W], conv_states [num_slots, conv_dim, W-1]
    (proj's dtype; updated in place), A_log, dt_bias [Hv] fp32, recurrent_states
    [num_slots, Hv, Dk, Dv] fp32 (updated in place), state_indices [B] int32, norm_weight [Dv]
    (proj's dtype or fp32) -> out [B, Hv, Dv] in proj's dtype.
    """
    batch, conv_dim = proj.shape[0], conv_weight.shape[0]
    hv, dv, dk = A_log.shape[0], norm_weight.shape[0], recurrent_states.shape[2]
    key_dim = (conv_dim - hv * dv) // 2
    mixed, z, ba = proj.split([conv_dim, hv * dv, 2 * hv], dim=-1)
    g, beta = gdn_gating(ba, A_log, dt_bias)
    mixed = causal_conv1d_update(mixed, conv_weight, None, conv_states, state_indices, True)
    q, k, v = mixed.split([key_dim, key_dim, hv * dv], dim=-1)
    out = gated_delta_rule_recurrent(
        q.reshape(batch, -1, dk), k.reshape(batch, -1, dk), v.reshape(batch, hv, dv),
        g, beta, recurrent_states, state_indices, use_qk_l2norm,
    )
    return gated_rms_norm(out, z.reshape(batch, hv, dv), norm_weight, eps)
