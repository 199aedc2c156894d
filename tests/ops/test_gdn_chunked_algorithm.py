"""The chunk-parallel Gated DeltaNet prefill, step for step as the CUDA kernels compute it
(`ops/csrc/cuda/linear_attn_delta_chunked.cu`), in pure torch, proved equal to the token-by-token
recurrence in fp64: odd lengths, several sequences, initial states, slot -1.

The CUDA form has three phases. Phase 1, parallel over (chunk, value head): the cumulative gate, the
UT inverse A = (I + L)^-1 by forward substitution, w = A diag(beta exp(cum)) k, u = A diag(beta) v,
q*exp(cum), k*exp(cum_last - cum), the masked intra-chunk scores P and exp(cum_last). Phase 2, sequential over the chunks of one (sequence, head),
only the recurrence: keep S_c (the state at the chunk's start), v_new = u - w S_c,
S = exp(cum_last) S_c + (k*exp(cum_last-cum))^T v_new. Phase 3, parallel over (chunk, value head):
o = (q*exp(cum)) S_c + P v_new.
"""

from __future__ import annotations

import pytest
import torch

from ops import reference_linear_attn as ref
from tests.ops.test_linear_attn import gdr_inputs, packed, slots_for, state_pool

C = ref.CHUNK_SIZE


def prepare_qk(q: torch.Tensor, k: torch.Tensor, num_v_heads: int, use_qk_l2norm: bool):
    """fp64 q, k per value head, l2-normalized when asked, q scaled: [L, Hk, Dk] -> [L, Hv, Dk]."""
    rep = num_v_heads // k.shape[1]
    q, k = (x.double().repeat_interleave(rep, dim=1) for x in (q, k))
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + ref.L2NORM_EPS)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + ref.L2NORM_EPS)
    return q * q.shape[-1] ** -0.5, k


def chunk_prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
    """Phase 1 for one chunk of one head; rows past the chunk's length are zero-padded here.

    Shapes: q, k [n, Dk] (normalized, q scaled), v [n, Dv], g, beta [n] with n <= C
    -> w, qg, kd [C, Dk], u [C, Dv], p [C, C], gl (a 0-d tensor).
    """
    n = q.shape[0]
    pad = C - n

    def padded(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(pad, *x.shape[1:])])

    q, k, v, g, beta = (padded(x) for x in (q, k, v, g, beta))
    cum = g.cumsum(0)  # padded rows have g = 0: cum stays at its last value
    lower = torch.ones(C, C, dtype=torch.bool).tril(-1)
    diff = (cum[:, None] - cum[None, :]).masked_fill(~lower.logical_or(torch.eye(C, dtype=torch.bool)), 0.0)
    system = (beta[:, None] * (k @ k.T) * diff.exp()).masked_fill(~lower, 0.0)
    inverse = torch.eye(C, dtype=system.dtype)
    for j in range(C - 1):  # A = (I + L)^-1 by forward substitution on the identity (a thread per column on CUDA)
        inverse[j + 1 :] -= system[j + 1 :, j, None] * inverse[j]
    # The row scalings of the right-hand sides are folded into A's columns (k and v stay the matmul operands).
    w = (inverse * (beta * cum.exp())[None, :]) @ k
    u = (inverse * beta[None, :]) @ v
    p = ((q @ k.T) * diff.exp()).masked_fill(~lower.logical_or(torch.eye(C, dtype=torch.bool)), 0.0)
    last = cum[n - 1] if n > 0 else cum.new_zeros(())
    return w, u, q * cum.exp()[:, None], k * (last - cum).exp()[:, None], p, last.exp()


def chunk_state_pass(w, u, kd, gl, state):
    """Phase 2 for one chunk: (v_new [C, Dv], the next chunk's state [Dk, Dv])."""
    v_new = u - w @ state
    return v_new, state * gl + kd.T @ v_new


def chunk_output(qg, p, chunk_state, v_new):
    """Phase 3 for one chunk, from the state at its start: o [C, Dv]."""
    return qg @ chunk_state + p @ v_new


def gated_delta_rule_chunked_torch(q, k, v, g, beta, cu_seqlens, states, state_indices, has_initial_state=None,
                                   use_qk_l2norm=True):
    """Same contract as `ref.gated_delta_rule_chunked`, computed as the CUDA kernels do."""
    num_v_heads = v.shape[1]
    out = torch.zeros(v.shape, dtype=q.dtype)
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(state_indices.tolist()):
        start, end = cu[b], cu[b + 1]
        qs, ks = prepare_qk(q[start:end], k[start:end], num_v_heads, use_qk_l2norm)
        for h in range(num_v_heads):
            if ref._starts_from_state(b, slot, has_initial_state):
                state = states[slot, h].double().clone()
            else:
                state = torch.zeros(k.shape[2], v.shape[2], dtype=torch.float64)
            chunks = []  # phase 1 (parallel on CUDA)
            for c0 in range(0, end - start, C):
                c1 = min(c0 + C, end - start)
                chunks.append((c0, c1, chunk_prepare(qs[c0:c1, h], ks[c0:c1, h], v[start + c0 : start + c1, h].double(),
                                                     g[start + c0 : start + c1, h].double(),
                                                     beta[start + c0 : start + c1, h].double())))
            kept = []  # phase 2 (sequential): S_c and v_new of every chunk
            for _, _, (w, u, _, kd, _, gl) in chunks:
                v_new, next_state = chunk_state_pass(w, u, kd, gl, state)
                kept.append((state, v_new))
                state = next_state
            for (c0, c1, (_, _, qg, _, p, _)), (chunk_state, v_new) in zip(chunks, kept):  # phase 3 (parallel)
                out[start + c0 : start + c1, h] = chunk_output(qg, p, chunk_state, v_new)[: c1 - c0].to(out.dtype)
            if slot >= 0:
                states[slot, h] = state.to(states.dtype)
    return out


def token_by_token(q, k, v, g, beta, cu_seqlens, states, state_indices, has_initial_state, use_qk_l2norm):
    """The recurrence one token at a time in fp64, an independent law:
    S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q."""
    out = torch.zeros(v.shape, dtype=q.dtype)
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(state_indices.tolist()):
        qs, ks = prepare_qk(q[cu[b] : cu[b + 1]], k[cu[b] : cu[b + 1]], v.shape[1], use_qk_l2norm)
        if ref._starts_from_state(b, slot, has_initial_state):
            state = states[slot].double().clone()
        else:
            state = torch.zeros(states.shape[1:], dtype=torch.float64)
        for i, t in enumerate(range(cu[b], cu[b + 1])):
            state = state * g[t].double().exp()[:, None, None]
            delta = (v[t].double() - torch.einsum("hkv,hk->hv", state, ks[i])) * beta[t].double()[:, None]
            state = state + ks[i][:, :, None] * delta[:, None, :]
            out[t] = torch.einsum("hkv,hk->hv", state, qs[i]).to(out.dtype)
        if slot >= 0:
            states[slot] = state.to(states.dtype)
    return out


@pytest.mark.parametrize("l2norm", [True, False])
@pytest.mark.parametrize("heads", [(2, 4, 16, 40), (3, 3, 32, 8)])
def test_chunked_algorithm_equals_token_by_token(heads, l2norm):
    torch.manual_seed(0)
    lens = [1, 63, 64, 65, 0, 200, 3]
    cu = packed(lens, "cpu")
    q, k, v, g, beta = gdr_inputs(sum(lens), heads, torch.float64, "cpu")
    if not l2norm:
        q, k = q * 0.2, k * 0.2
    pool = state_pool(len(lens) + 2, heads, "cpu").double()
    slots = slots_for(len(lens), "cpu")
    has_init = torch.arange(len(lens)) % 2 == 1
    expected_pool = pool.clone()
    expected = token_by_token(q, k, v, g, beta, cu, expected_pool, slots, has_init, l2norm)
    out = gated_delta_rule_chunked_torch(q, k, v, g, beta, cu, pool, slots, has_init, l2norm)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pool, expected_pool, rtol=1e-9, atol=1e-9)
