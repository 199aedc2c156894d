"""bench/ops.py families `moe_experts` and `moe_decode`: the MoE expert ops at the
Qwen3-VL-30B-A3B expert shape (E=128, top-8, hidden 2048, intermediate 768).

`moe_decode` times the two fused decode ops against the two-op chains they replace, at
T = 1, 4, 16: `moe_gate_route` vs the router linear (as `ReplicatedLinear` runs it) then
`moe_route`, and `moe_combine_add_rms_norm` vs `moe_combine` then `fused_add_rms_norm`; and at
T = 1, 4 `moe_decode_block` (the layer's post-attention add + norm and the whole block, one
launch) vs the six-op chain it replaces (bytes: the router and the distinct experts hit).

Each token count runs today's chain (routing, `moe_align`, `moe_gate_up`, `moe_down`,
`moe_combine`) and its two GEMMs alone in the 64- and 128-row block tiles; from
`GROUPED_GEMM_MIN_TOKENS` also the path `FusedExperts` takes there, in the same run:
`moe_permute` alone, the two `torch._grouped_mm` GEMMs alone over the unpadded rows, and the
grouped chain (routing, permutation, gather, GEMMs, SiLU-and-mul, weighted combine). Bytes are
the distinct experts' weights read, FLOPs the routed pairs' GEMMs (% copy at small T, % mm at
large).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F

import ops
from bench.op_case import Case, nbytes, rel_err
from models.layers.linear import streams_small_rows
from models.layers.moe import GROUPED_GEMM_MIN_TOKENS, grouped_experts
from ops import reference, reference_moe
from ops.reference_moe import align_block_size


def _moe_chain(module, x, gate_up, down, logits, k: int) -> torch.Tensor:
    weights, ids = ops.topk_softmax(logits, k, True)
    alignment = module.moe_align(ids, gate_up.shape[0])
    h = module.moe_gate_up(x, gate_up, alignment)
    return module.moe_combine(module.moe_down(h, down, weights, alignment), alignment)


def _grouped_chain(x, gate_up, down, logits, k: int) -> torch.Tensor:
    weights, ids = ops.topk_softmax(logits, k, True)
    return grouped_experts(x, gate_up, down, weights, ops.moe_permute(ids, gate_up.shape[0]))


def moe_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    experts, k, hidden, inter = (8, 2, 64, 32) if smoke else (128, 8, 2048, 768)
    gate_up = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, inter, device=dev, dtype=dtype) / inter**0.5
    for t in [3] if smoke else [1, 8, 64, 512, 1024, 4096]:
        x = torch.randn(t, hidden, device=dev, dtype=dtype)
        logits = torch.randn(t, experts, device=dev)
        hit = torch.unique(ops.topk_softmax(logits, k, True)[1]).numel()
        run = partial(_moe_chain, ops, x, gate_up, down, logits, k)
        reference_chain = partial(_moe_chain, reference_moe, x, gate_up, down, logits, k)
        check = partial(lambda run, ref: rel_err(run(), ref()), run, reference_chain)
        weight_bytes = hit * 3 * hidden * inter * dtype.itemsize
        shape = f"T={t} E={experts} k={k} H={hidden} I={inter}"
        yield Case("moe_experts", shape, run, check, weight_bytes + 2 * nbytes(x), flops=t * k * 6 * hidden * inter)
        yield from _moe_gemm_cases(x, gate_up, down, logits, k, hit)
        # torch's grouped GEMM kernel is bf16 only (fp16 loops over the groups on the host).
        if hasattr(torch, "_grouped_mm") and (smoke or (dtype == torch.bfloat16 and t >= GROUPED_GEMM_MIN_TOKENS)):
            grouped = partial(_grouped_chain, x, gate_up, down, logits, k)
            check = partial(lambda run, ref: rel_err(run(), ref()), grouped, reference_chain)
            yield Case("moe_experts", f"grouped chain {shape}", grouped, check,
                       weight_bytes + 2 * nbytes(x), flops=t * k * 6 * hidden * inter)
            yield from _grouped_gemm_cases(x, gate_up, down, logits, k, hit)


def _moe_gemm_cases(x, gate_up, down, logits, k: int, hit: int) -> Iterator[Case]:
    """The two expert GEMMs alone (alignment precomputed): % of copy over their routed weights,
    % of the matmul rate over the routed pairs' FLOPs. Prefill sizes run in both large block
    sizes (64 and 128 rows, `b<rows>`; the default first) to show where the switch pays."""
    weights, ids = ops.topk_softmax(logits, k, True)
    experts = gate_up.shape[0]
    default = align_block_size(ids.numel(), experts)
    blocks = [default] + ([b for b in (64, 128) if b != default] if default > 16 else [])
    shape = f"T={x.shape[0]} E={experts} k={k} H={x.shape[1]} I={down.shape[2]}"
    for block in blocks:
        alignment = ops.moe_align(ids, experts, block)
        h = ops.moe_gate_up(x, gate_up, alignment)
        rows = alignment.pair_pos.flatten().long()
        for name, run, ref in (
            ("gate_up", partial(ops.moe_gate_up, x, gate_up, alignment),
             partial(reference_moe.moe_gate_up, x, gate_up, alignment)),
            ("down", partial(ops.moe_down, h, down, weights, alignment),
             partial(reference_moe.moe_down, h, down, weights, alignment)),
        ):
            per_expert = (gate_up if name == "gate_up" else down)[0]
            check = partial(lambda run, ref, rows=rows: rel_err(run()[rows], ref()[rows]), run, ref)
            yield Case("moe_experts", f"{name} b{block} {shape}", run, check,
                       hit * nbytes(per_expert), flops=2 * rows.numel() * per_expert.numel())


def _per_expert_mm(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """fp32 a[rows of e] @ weight[e]^T, one expert at a time (the grouped GEMM's reference)."""
    out = torch.zeros(a.shape[0], weight.shape[1], device=a.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = F.linear(a[start:end].float(), weight[e].float())
        start = end
    return out


def _grouped_gemm_cases(x, gate_up, down, logits, k: int, hit: int) -> Iterator[Case]:
    """`moe_permute` and the two `torch._grouped_mm` GEMMs alone, over the unpadded rows."""
    _, ids = ops.topk_softmax(logits, k, True)
    experts = gate_up.shape[0]
    shape = f"T={x.shape[0]} E={experts} k={k} H={x.shape[1]} I={down.shape[2]}"
    permute = partial(ops.moe_permute, ids, experts)

    def permute_check() -> float:
        got, ref = permute(), reference_moe.moe_permute(ids, experts)
        same = all(torch.equal(getattr(got, n).cpu(), getattr(ref, n).cpu())
                   for n in ("row_tokens", "pair_pos", "expert_offsets"))
        return 0.0 if same else float("inf")

    yield Case("moe_experts", f"moe_permute {shape}", permute, permute_check, 4 * ids.numel() * 3 + 4 * experts)
    permutation = permute()
    offsets = permutation.expert_offsets
    rows = x.index_select(0, permutation.row_tokens)
    h = ops.silu_and_mul(torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets))
    used = int(offsets[-1])  # rows past the last offset are unspecified
    for name, a, weight in (("gate_up", rows, gate_up), ("down", h, down)):
        run = partial(torch._grouped_mm, a, weight.transpose(1, 2), offs=offsets)
        check = partial(lambda run, a=a, weight=weight: rel_err(
            run()[:used], _per_expert_mm(a, weight, offsets)[:used]), run)
        yield Case("moe_experts", f"grouped {name} {shape}", run, check,
                   hit * nbytes(weight[0]), flops=2 * used * weight[0].numel())


def _router_then_route(x: torch.Tensor, gate: torch.Tensor, k: int):
    """The unfused router: `ReplicatedLinear`'s matmul, then `moe_route`."""
    logits = ops.linear_small(x, gate, None) if streams_small_rows(x) else F.linear(x, gate)
    return ops.moe_route(logits, k, True)


def _combine_then_norm(y, alignment, residual, norm_weight, eps: float) -> torch.Tensor:
    out = ops.moe_combine(y, alignment, None)
    ops.fused_add_rms_norm(out, residual, norm_weight, eps)
    return out


def moe_decode_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    experts, k, hidden = (8, 2, 64) if smoke else (128, 8, 2048)
    gate = torch.randn(experts, hidden, device=dev, dtype=dtype) / hidden**0.5
    norm_weight = torch.ones(hidden, device=dev, dtype=dtype)
    arrivals = torch.zeros(1, dtype=torch.int32, device=dev)
    for t in [3] if smoke else [1, 4, 16]:
        x = torch.randn(t, hidden, device=dev, dtype=dtype)
        shape = f"T={t} E={experts} k={k} H={hidden}"
        ref = partial(reference_moe.moe_gate_route, x, gate, k, True, arrivals)
        fused = partial(ops.moe_gate_route, x, gate, k, True, arrivals)
        chain = partial(_router_then_route, x, gate, k)
        moved = nbytes(gate, x) + t * k * 8
        for name, run in (("moe_gate_route", fused), ("  linear + moe_route", chain)):
            check = partial(lambda run: rel_err(run()[0], ref()[0]), run)
            yield Case("moe_decode", f"{name} {shape}", run, check, moved)
        _, _, alignment = ops.moe_gate_route(x, gate, k, True, arrivals)
        y = torch.randn(alignment.capacity, hidden, device=dev, dtype=dtype)
        residual = torch.randn(t, hidden, device=dev, dtype=dtype)
        eps = 1e-6
        def ref_norm(y=y, alignment=alignment, residual=residual) -> torch.Tensor:
            return reference_moe.moe_combine_add_rms_norm(y, alignment, None, residual.clone(), norm_weight, eps)[0]

        moved = nbytes(norm_weight) + (k + 3) * t * hidden * dtype.itemsize
        for name, run in (
            ("moe_combine_add_rms_norm", partial(ops.moe_combine_add_rms_norm, y, alignment, None, residual,
                                                 norm_weight, eps)),
            ("  moe_combine + add_rms_norm", partial(_combine_then_norm, y, alignment, residual, norm_weight, eps)),
        ):
            # Each timed call adds into the residual in place; the check runs from a saved copy.
            check = partial(_restored_check, run, ref_norm, residual, residual.clone())
            yield Case("moe_decode", f"{name} {shape}", run, check, moved)
    yield from moe_block_cases(dev, dtype, smoke)


def _restored_check(run, ref, residual: torch.Tensor, saved: torch.Tensor) -> float:
    """rel_err of `run()` vs `ref()`, both from `saved` as the residual they add into."""
    residual.copy_(saved)
    expected = ref()
    residual.copy_(saved)
    out = run()
    got = out[0] if isinstance(out, tuple) else out
    residual.copy_(saved)
    return rel_err(got, expected)


def _block_chain(x, residual, norm_weight, eps: float, gate, gate_up, down, k: int) -> torch.Tensor:
    """What `moe_decode_block` replaces, as the model runs it: the add + norm in place on x, the
    router as `ReplicatedLinear` runs it, `moe_route`, the two expert GEMVs and the combine."""
    ops.fused_add_rms_norm(x, residual, norm_weight, eps)
    weights, _, alignment = _router_then_route(x, gate, k)
    h = ops.moe_gate_up(x, gate_up, alignment)
    return ops.moe_combine(ops.moe_down(h, down, weights, alignment), alignment, None)


def moe_block_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    """`moe_decode_block` vs its chain at the 30B-A3B shape, T = 1 and 4 (part of `moe_decode`)."""
    experts, k, hidden, inter = (8, 2, 64, 32) if smoke else (128, 8, 2048, 768)
    gate = torch.randn(experts, hidden, device=dev, dtype=dtype) * (4 / hidden**0.5)
    gate_up = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, inter, device=dev, dtype=dtype) / inter**0.5
    norm_weight = torch.ones(hidden, device=dev, dtype=dtype)
    barrier = torch.zeros(1, dtype=torch.int32, device=dev)
    eps = 1e-6
    for t in [3] if smoke else [1, 4]:
        x = torch.randn(t, hidden, device=dev, dtype=dtype)
        residual = torch.randn(t, hidden, device=dev, dtype=dtype)
        saved_x, saved_res = x.clone(), residual.clone()
        normed = x.clone()
        reference.fused_add_rms_norm(normed, residual.clone(), norm_weight, eps)
        _, ids, _ = reference_moe.moe_route(F.linear(normed, gate), k, True)
        hit = torch.unique(ids).numel()
        experts_read = hit * (nbytes(gate_up[0]) + nbytes(down[0]))
        moved = nbytes(gate, norm_weight) + experts_read + 4 * t * hidden * dtype.itemsize  # + x, residual, out
        shape = f"T={t} E={experts} k={k} H={hidden} I={inter}"

        def ref(x=x, residual=residual, saved_x=saved_x, saved_res=saved_res) -> torch.Tensor:
            return reference_moe.moe_decode_block(saved_x.clone(), saved_res.clone(), norm_weight, eps, gate, gate_up,
                                                  down, k, True, barrier)[0]

        block = partial(ops.moe_decode_block, x, residual, norm_weight, eps, gate, gate_up, down, k, True, barrier)
        chain = partial(_block_chain, x, residual, norm_weight, eps, gate, gate_up, down, k)
        for name, run in (("moe_decode_block", block), ("  add_rms_norm + router + route + experts + combine", chain)):
            # Each timed call adds into the residual (the chain also norms x) in place; the check
            # runs from saved copies.
            def check(run=run, x=x, residual=residual, saved_x=saved_x, saved_res=saved_res, ref=ref) -> float:
                expected = ref()
                x.copy_(saved_x)
                residual.copy_(saved_res)
                got = run()
                got = got[0] if isinstance(got, tuple) else got
                x.copy_(saved_x)
                residual.copy_(saved_res)
                return rel_err(got, expected)

            yield Case("moe_decode", f"{name} {shape}", run, check, moved)
