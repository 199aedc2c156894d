"""Speed of every splitvl CUDA op at Qwen3-VL shapes, next to this card's copy and matmul rates.

    python bench/ops.py --json $OUT/ops.json     # GPU: all ops, realistic sizes
    python bench/ops.py --ops varlen_attention   # one op family
    python bench/ops.py --ops varlen_attention --attn-sm90 on,off   # both attention kernels, row by row
    python bench/ops.py --ops paged_attention_decode --shapes 30B-A3B --decode-merge on,off
                                                 # paged decode with its merge fused / as a second kernel
    python bench/ops.py --smoke                  # any device (CPU too): each op once, tiny sizes

Each case runs once against `ops.reference` (max error, relative to the
reference's largest value, is reported and checked), then is timed with CUDA
events over a CUDA graph of many back-to-back calls after a warmup (kernel time,
no host overhead). Memory-bound ops report
achieved GB/s (bytes the op must read + write) against a large `copy_` in the
same run; attention prefill reports TFLOP/s against a large bf16 `torch.mm`.
Inputs that fit in L2 (50 MB) stay there across the replayed calls, so such
rows can exceed the DRAM copy rate.
Shapes: Qwen3-VL-2B (hidden 2048, 16/8 heads, head_dim 128, intermediate 6144),
8B (4096, 32/8, 128, 12288), the ViT (hidden 1024/1152, head_dim 64/72); the
Qwen3.5 Gated DeltaNet ops (causal conv, delta rule prefill/decode, gated norm)
at 0.8B (16/16 heads x 128) and 16/32 x 128 linear-attention shapes.
paged_attention_decode also runs at the 30B-A3B (32/4 heads x 128) and
Qwen3.5-0.8B (8/2 x 256) attention shapes of configs/models/*.json; `--decode-merge on,off`
times each case with the partition merge fused into the decode kernel (one launch) and as the
separate merge kernel, on adjacent rows. `--shapes` keeps the cases whose shape contains one of
the given strings.
Rows with FLOPs: the conv and delta rule count their nominal multiply-adds.
MoE experts (align, gate_up, down, combine; from 512 tokens also the grouped-GEMM path,
bench/ops_moe.py) at the Qwen3-VL-30B-A3B expert shape (E=128, top-8, hidden 2048,
intermediate 768): bytes are the distinct experts' weights read, FLOPs the routed pairs'
GEMMs (% copy at small T, % mm at large).
`qwen3_5_fusions`: Qwen3.5-0.8B decode pieces (hidden 1024, 16 value heads, from
configs/models/qwen3.5-0.8b.json), each op next to the composed torch kernels it
replaced ("composed (old)" rows), timed the same way in the same run.
`linear_small`: the decoders' dense linears at decode rows (M = 1, 4, 16) as one weight-streaming
kernel next to F.linear (cuBLAS) in the same run (bench/ops_linear.py gives the shapes); their
% copy is over the weight bytes, cycled through copies larger than L2 as a decode step reads them.
`add_rms_norm_linear_small`: a decoder layer's input norm folded into its qkv projection at the
30B-A3B (2048 -> 5120) and 8B (4096 -> 6144) shapes, T = 1, 4 and 16, next to fused_add_rms_norm +
linear_small and fused_add_rms_norm + F.linear (cuBLAS) in the same run.
`qk_norm_rope_and_cache`: the decode attention's q/k norm + RoPE + KV-cache write at the 30B-A3B
shape (T = 1 and 64) next to qk_norm_rope + reshape_and_cache ("qk_norm_rope + cache (old)").
`gated_delta_net_decode`: the fused Gated DeltaNet decode step at B=1 and 64 next to the
four ops it replaced ("four ops (old)"); its % copy is nearly that of the state bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/ops.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ops  # noqa: E402
from bench.common import (  # noqa: E402
    ATTN_SM90_HELP, attn_sm90_settings, cuda_time_fn, measure_peaks, on_off_settings, print_table, write_json,
)
from bench.op_case import Case, nbytes, rel_err  # noqa: E402
from bench.ops_linear import linear_small_cases, norm_linear_cases  # noqa: E402
from bench.ops_moe import moe_cases, moe_decode_cases  # noqa: E402
from ops import reference, reference_linear_attn  # noqa: E402

EPS = 1e-6
LLM = {"2B": (16, 8, 128), "8B": (32, 8, 128)}  # (q heads, kv heads, head_dim)
HIDDEN = {"2B": 2048, "8B": 4096}
INTERMEDIATE = {"2B": 6144, "8B": 12288}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass(frozen=True, slots=True)
class Row:
    op: str
    shape: str
    us: float
    gbps: float
    pct_copy: float
    tflops: float
    pct_mm: float
    rel_err: float


def _in_place_check(kernel: Callable, ref: Callable, *tensors: torch.Tensor) -> float:
    """Run kernel and reference on clones of the in-place tensors; compare every one."""
    mine, theirs = [t.clone() for t in tensors], [t.clone() for t in tensors]
    kernel(*mine)
    ref(*theirs)
    return max(rel_err(a, b) for a, b in zip(mine, theirs))


def norm_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    sizes = [(3, 64)] if smoke else [(t, HIDDEN[m]) for m in HIDDEN for t in (1, 16, 256, 16384)]
    for t, h in sizes:
        x = torch.randn(t, h, device=dev, dtype=dtype)
        r, w = torch.randn_like(x), torch.randn(h, device=dev, dtype=dtype)
        yield Case("rms_norm", f"T={t} H={h}", partial(ops.rms_norm, x, w, EPS),
                   lambda x=x, w=w: rel_err(ops.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS)),
                   2 * nbytes(x) + nbytes(w))
        yield Case("fused_add_rms_norm", f"T={t} H={h}", partial(ops.fused_add_rms_norm, x, r, w, EPS),
                   partial(_in_place_check, partial(_fused, ops, w), partial(_fused, reference, w), x, r),
                   4 * nbytes(x) + nbytes(w))
    t, (hq, hkv, d) = (3, (4, 2, 32)) if smoke else (256, LLM["2B"])
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
    q, w = qkv[:, : hq * d].view(t, hq, d), torch.randn(d, device=dev, dtype=dtype)
    yield Case("rms_norm", f"q-norm T={t} [T,{hq},{d}] view", partial(ops.rms_norm, q, w, EPS),
               lambda: rel_err(ops.rms_norm(q, w, EPS), reference.rms_norm(q, w, EPS)),
               2 * nbytes(q) + nbytes(w))


def _fused(module, w: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> None:
    module.fused_add_rms_norm(x, r, w, EPS)


def _cos_sin_cache(max_pos: int, rot_dim: int, dev: str) -> torch.Tensor:
    inv_freq = 1.0 / (5_000_000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dev)


def rotary_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    configs = [("2B", 3, [1, 1, 2])] if smoke else [(m, t, [24, 20, 20]) for m in LLM for t in (1, 16, 256, 16384)]
    for model, t, section in configs:
        hq, hkv, d = (4, 2, 8) if smoke else LLM[model]
        cache = _cos_sin_cache(4096, 2 * sum(section), dev)
        positions = torch.randint(0, 4096, (3, t), device=dev)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
        q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d]
        args = (d, cache, True, section, True)

        def rope(module, q, k, positions=positions, args=args):
            module.rotary_embedding(positions, q, k, *args)

        rot = cache.shape[1]
        yield Case("rotary_embedding", f"mrope T={t} {hq}/{hkv}x{d}", partial(rope, ops, q, k),
                   partial(_in_place_check, partial(rope, ops), partial(rope, reference), q, k),
                   2 * t * (hq + hkv) * rot * qkv.element_size() + t * rot * 4 + nbytes(positions))


# (q heads, kv heads, head_dim, mrope_section) of configs/models/*.json; the 0.8B rotates a quarter.
QK_NORM = {"8B": (32, 8, 128, [24, 20, 20]), "30B-A3B": (32, 4, 128, [24, 20, 20]), "0.8B": (8, 2, 256, [11, 11, 10])}


def _qk_composed(module, positions, q, k, wq, wk, cache, section) -> None:
    """The three kernels the attention layers ran before qk_norm_rope: q norm, k norm, rotary."""
    q.copy_(module.rms_norm(q, wq, EPS))
    k.copy_(module.rms_norm(k, wk, EPS))
    module.rotary_embedding(positions, q, k, q.shape[-1], cache, True, section, True)


def qk_norm_rope_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    """The attention layers' q/k norm + RoPE: the one op next to the three it replaced (whose
    norms write new tensors: the model copied nothing back, so the old path's bytes were the same)."""
    configs = [("tiny", 3, (4, 2, 32, [8, 4, 4]))] if smoke else [
        (m, t, QK_NORM[m]) for m in QK_NORM for t in (1, 64, 4096)]
    for model, t, (hq, hkv, d, section) in configs:
        cache = _cos_sin_cache(4096, 2 * sum(section), dev)
        positions = torch.randint(0, 4096, (3, t), device=dev)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
        q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        w32 = dtype != torch.float32 and model == "0.8B"  # Qwen3.5's fp32 `1 + w`
        wq, wk = (torch.randn(d, device=dev, dtype=torch.float32 if w32 else dtype) for _ in range(2))
        moved = 2 * nbytes(q, k) + nbytes(wq, wk) + t * cache.shape[1] * 4 + nbytes(positions)

        def fused(module, q, k, positions=positions, wq=wq, wk=wk, cache=cache, section=section):
            module.qk_norm_rope(positions, q, k, wq, wk, EPS, cache, True, section, True)

        def old(module, q, k, positions=positions, wq=wq, wk=wk, cache=cache, section=section):
            _qk_composed(module, positions, q, k, wq, wk, cache, section)

        shape = f"{model} T={t} {hq}/{hkv}x{d}"
        yield Case("qk_norm_rope", shape, partial(fused, ops, q, k),
                   partial(_in_place_check, partial(fused, ops), partial(fused, reference), q, k), moved)
        yield Case("  norm, norm, rotary (old)", shape, partial(old, ops, q, k),
                   partial(_in_place_check, partial(old, ops), partial(fused, reference), q, k), moved)


def _qk_cache_pair(module, positions, q, k, v, wq, wk, cache, kc, vc, slots, section) -> None:
    """The two ops the attention layers ran before qk_norm_rope_and_cache."""
    module.qk_norm_rope(positions, q, k, wq, wk, EPS, cache, True, section, True)
    module.reshape_and_cache(k, v, kc, vc, slots)


def qk_norm_rope_cache_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    """The decode attention's q/k norm + RoPE + KV-cache write at the 30B-A3B shape (interleaved
    mRoPE): the one op next to qk_norm_rope + reshape_and_cache (bytes: the fused op's, both rows)."""
    block = 16
    configs = [("tiny", 3, (4, 2, 32, [8, 4, 4]))] if smoke else [
        ("30B-A3B", t, QK_NORM["30B-A3B"]) for t in (1, 64)]
    for model, t, (hq, hkv, d, section) in configs:
        cache = _cos_sin_cache(4096, 2 * sum(section), dev)
        positions = torch.randint(0, 4096, (3, t), device=dev)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
        wq, wk = (torch.randn(d, device=dev, dtype=dtype) for _ in range(2))
        num_blocks = 2 * t // block + 2
        kc = torch.zeros(num_blocks, block, hkv, d, device=dev, dtype=dtype)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(num_blocks * block, device=dev)[:t]
        moved = 2 * nbytes(q, k) + nbytes(v) + 2 * nbytes(k) + nbytes(wq, wk) + t * cache.shape[1] * 4 \
            + nbytes(positions, slots)

        def fused(module, q, k, kc, vc, positions=positions, v=v, wq=wq, wk=wk, cache=cache, slots=slots,
                  section=section):
            module.qk_norm_rope_and_cache(positions, q, k, v, wq, wk, EPS, cache, kc, vc, slots, True, section, True)

        def pair(module, q, k, kc, vc, positions=positions, v=v, wq=wq, wk=wk, cache=cache, slots=slots,
                 section=section):
            _qk_cache_pair(module, positions, q, k, v, wq, wk, cache, kc, vc, slots, section)

        shape = f"{model} T={t} {hq}/{hkv}x{d}"
        yield Case("qk_norm_rope_and_cache", shape, partial(fused, ops, q, k, kc, vc),
                   partial(_in_place_check, partial(fused, ops), partial(fused, reference), q, k, kc, vc), moved)
        yield Case("  qk_norm_rope + cache (old)", shape, partial(pair, ops, q, k, kc, vc),
                   partial(_in_place_check, partial(pair, ops), partial(fused, reference), q, k, kc, vc), moved)


def activation_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    sizes = [(3, 40)] if smoke else [(t, INTERMEDIATE[m]) for m in INTERMEDIATE for t in (1, 16, 256, 8192)]
    for t, inter in sizes:
        x = torch.randn(t, 2 * inter, device=dev, dtype=dtype)
        yield Case("silu_and_mul", f"T={t} I={inter}", partial(ops.silu_and_mul, x),
                   lambda x=x: rel_err(ops.silu_and_mul(x), reference.silu_and_mul(x)), nbytes(x) * 3 // 2)
    for t, inter in [(5, 24)] if smoke else [(256, 4304), (4096, 4304), (32768, 4304)]:
        x = torch.randn(t, inter, device=dev, dtype=dtype)
        yield Case("gelu_tanh", f"ViT T={t} I={inter}", partial(ops.gelu_tanh, x),
                   lambda x=x: rel_err(ops.gelu_tanh(x), reference.gelu_tanh(x)), 2 * nbytes(x))


def cache_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    hkv, d, block = (2, 16, 4) if smoke else (8, 128, 16)
    for t in [5] if smoke else [1, 64, 256, 4096, 65536]:
        num_blocks = 2 * t // block + 2
        kc = torch.zeros(num_blocks, block, hkv, d, device=dev, dtype=dtype)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(num_blocks * block, device=dev)[:t]
        k, v = torch.randn(t, hkv, d, device=dev, dtype=dtype), torch.randn(t, hkv, d, device=dev, dtype=dtype)

        def write(module, kc, vc, k=k, v=v, slots=slots):
            module.reshape_and_cache(k, v, kc, vc, slots)

        yield Case("reshape_and_cache", f"T={t} {hkv}x{d}", partial(write, ops, kc, vc),
                   partial(_in_place_check, partial(write, ops), partial(write, reference), kc, vc),
                   4 * nbytes(k))


def _paged(lengths: list[int], hkv: int, d: int, block: int, dev: str, dtype: torch.dtype):
    """Random caches with each sequence's blocks scattered; -> (key_cache, value_cache, block_tables)."""
    per_seq = max(1, max(-(-n // block) for n in lengths))
    num_blocks = per_seq * len(lengths)
    kc = torch.randn(num_blocks, block, hkv, d, device=dev, dtype=dtype)
    tables = torch.randperm(num_blocks, device=dev).view(len(lengths), per_seq).to(torch.int32)
    return kc, torch.randn_like(kc), tables


# The MoE and Qwen3.5 attention shapes (GQA groups 8 and 4, D 128 and 256; QK_NORM's heads).
DECODE_MODELS = {**LLM, "30B-A3B": QK_NORM["30B-A3B"][:3], "0.8B": QK_NORM["0.8B"][:3]}


def decode_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    grid = [(m, b, c) for m in LLM for b in (1, 8, 64) for c in (128, 1024, 4096, 8192)]
    grid += [(m, b, c) for m in ("30B-A3B", "0.8B") for b in (1, 64) for c in (512, 1024, 4096)]
    for model, batch, ctx in [("2B", 2, 40)] if smoke else grid:
        hq, hkv, d = (4, 2, 64) if smoke else DECODE_MODELS[model]
        kc, vc, tables = _paged([ctx] * batch, hkv, d, 4 if smoke else 16, dev, dtype)
        q = torch.randn(batch, hq, d, device=dev, dtype=dtype)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        args = (q, kc, vc, tables, lens, d**-0.5)
        yield Case("paged_attention_decode", f"{model} B={batch} ctx={ctx}",
                   partial(ops.paged_attention_decode, *args),
                   lambda args=args: rel_err(ops.paged_attention_decode(*args), reference.paged_attention_decode(*args)),
                   2 * batch * ctx * hkv * d * q.element_size() + 2 * nbytes(q))


def _attn_flops(lq: list[int], lk: list[int], hq: int, d: int, causal: bool) -> int:
    pairs = 0
    for nq, nk in zip(lq, lk):
        pairs += sum(min(nk, i + nk - nq + 1) for i in range(nq)) if causal else nq * nk
    return 4 * pairs * hq * d


def _cu(lengths: list[int], dev: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)


def varlen_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    # (name, heads, query lengths, key lengths, causal, paged)
    if smoke:
        grid = [("llm", (4, 2, 64), [5, 17], [5, 17], True, False),
                ("chunk", (4, 2, 64), [4], [13], True, True),
                ("vit", (2, 2, 72), [9, 20], [9, 20], False, False)]
    else:
        grid = [(f"{m} prefill {n}", LLM[m], [n], [n], True, False) for m in LLM for n in (512, 2048, 4096)]
        grid += [("2B 4x1024", LLM["2B"], [1024] * 4, [1024] * 4, True, False),
                 ("2B chunk 512+3584 paged", LLM["2B"], [512], [4096], True, True)]
        grid += [(f"ViT d={d} {n}x{s}", (16, 16, d), [s] * n, [s] * n, False, False)
                 for d in (64, 72) for n, s in ((4, 1024), (1, 4096))]
        grid += [("ViT d=72 8x4096", (16, 16, 72), [4096] * 8, [4096] * 8, False, False)]
    for name, (hq, hkv, d), lq, lk, causal, paged in grid:
        qkv = torch.randn(sum(lq), (hq + 2 * hkv) * d, device=dev, dtype=dtype)  # fused qkv views
        q = qkv[:, : hq * d].view(-1, hq, d)
        meta = (_cu(lq, dev), _cu(lk, dev), max(lq), max(lk), d**-0.5, causal)
        if paged:
            kc, vc, tables = _paged(lk, hkv, d, 16, dev, dtype)
            args, kwargs = (q, None, None, *meta), {"key_cache": kc, "value_cache": vc, "block_tables": tables}
        else:
            k = qkv[:, hq * d : (hq + hkv) * d].view(-1, hkv, d)
            v = qkv[:, (hq + hkv) * d :].view(-1, hkv, d)
            args, kwargs = (q, k, v, *meta), {}
        yield Case("varlen_attention", f"{name} {hq}/{hkv}x{d}", partial(ops.varlen_attention, *args, **kwargs),
                   lambda a=args, kw=kwargs: rel_err(ops.varlen_attention(*a, **kw), reference.varlen_attention(*a, **kw)),
                   2 * nbytes(q) + 2 * sum(lk) * hkv * d * q.element_size(), _attn_flops(lq, lk, hq, d, causal))


def topk_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    for t, experts, k in [(3, 8, 2)] if smoke else [(t, e, k) for e, k in ((128, 8), (512, 10)) for t in (1, 256)]:
        gating = torch.randn(t, experts, device=dev, dtype=dtype)

        def check(gating=gating, k=k) -> float:
            w, ids = ops.topk_softmax(gating, k, True)
            w_ref, ids_ref = reference.topk_softmax(gating, k, True)
            return rel_err(w, w_ref) if torch.equal(ids.cpu(), ids_ref.cpu()) else math.inf

        yield Case("topk_softmax", f"T={t} E={experts} k={k}", partial(ops.topk_softmax, gating, k, True),
                   check, nbytes(gating) + t * k * 8)


# Qwen3.5 Gated DeltaNet (k heads, v heads, head_k_dim, head_v_dim): 0.8B, and the 16/32-head
# layout of transformers' Qwen3.5 config defaults (larger models); conv width 4.
LINEAR = {"0.8B": (16, 16, 128, 128), "16/32": (16, 32, 128, 128)}
CONV_WIDTH = 4


def _state_check(kernel: Callable, ref: Callable, *states: torch.Tensor) -> float:
    """Run kernel and reference on clones of the state pools; compare outputs and states."""
    mine, theirs = [t.clone() for t in states], [t.clone() for t in states]
    out, out_ref = kernel(*mine), ref(*theirs)
    return max([rel_err(out, out_ref)] + [rel_err(a, b) for a, b in zip(mine, theirs)])


def _linear_shapes(smoke: bool) -> list[tuple[str, tuple[int, int, int, int]]]:
    return [("tiny", (2, 4, 16, 16))] if smoke else list(LINEAR.items())


def conv1d_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    w = CONV_WIDTH
    for model, (hk, hv, dk, dv) in _linear_shapes(smoke):
        dim = 2 * hk * dk + hv * dv
        weight = torch.randn(dim, w, device=dev, dtype=dtype) * 0.5
        for lens in [[5, 9]] if smoke else [[256], [4096], [1024] * 4]:
            x = torch.randn(sum(lens), dim, device=dev, dtype=dtype)
            states = torch.randn(len(lens) + 1, dim, w - 1, device=dev, dtype=dtype)
            cu, idx = _cu(lens, dev), torch.arange(1, len(lens) + 1, dtype=torch.int32, device=dev)
            init = torch.ones(len(lens), dtype=torch.bool, device=dev)

            def fwd(module, s, x=x, weight=weight, cu=cu, idx=idx, init=init):
                return module.causal_conv1d_fwd(x, weight, None, s, cu, idx, init, True)

            yield Case("causal_conv1d_fwd", f"{model} dim={dim} {len(lens)}x{max(lens)}", partial(fwd, ops, states),
                       partial(_state_check, partial(fwd, ops), partial(fwd, reference_linear_attn), states),
                       2 * nbytes(x) + nbytes(weight) + 2 * len(lens) * dim * (w - 1) * x.element_size(),
                       2 * w * x.numel())
        for batch in [3] if smoke else [1, 64, 256]:
            x = torch.randn(batch, dim, device=dev, dtype=dtype)
            states = torch.randn(batch, dim, w - 1, device=dev, dtype=dtype)
            idx = torch.randperm(batch, device=dev).to(torch.int32)

            def update(module, s, x=x, weight=weight, idx=idx):
                return module.causal_conv1d_update(x, weight, None, s, idx, True)

            yield Case("causal_conv1d_update", f"{model} dim={dim} B={batch}", partial(update, ops, states),
                       partial(_state_check, partial(update, ops), partial(update, reference_linear_attn), states),
                       2 * nbytes(x) + nbytes(weight) + 2 * nbytes(states), 2 * w * x.numel())


def _gdr_inputs(t: int, heads: tuple[int, int, int, int], dev: str, dtype: torch.dtype):
    """q, k, v as views of one fused conv output (as the model has them), log decay g, beta."""
    hk, hv, dk, dv = heads
    fused = torch.randn(t, 2 * hk * dk + hv * dv, device=dev, dtype=dtype)
    q = fused[:, : hk * dk].view(t, hk, dk)
    k = fused[:, hk * dk : 2 * hk * dk].view(t, hk, dk)
    v = fused[:, 2 * hk * dk :].view(t, hv, dv)
    g = -torch.nn.functional.softplus(torch.randn(t, hv, device=dev) + 2.0)
    return q, k, v, g, torch.rand(t, hv, device=dev)


def delta_rule_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    """Chunked prefill (chunk 64) and the decode step; the state pools are fp32."""
    c = reference_linear_attn.CHUNK_SIZE
    for model, heads in _linear_shapes(smoke):
        hk, hv, dk, dv = heads
        for lens in [[5, 70]] if smoke else [[256], [4096], [1024] * 4, [16384]]:
            q, k, v, g, beta = _gdr_inputs(sum(lens), heads, dev, dtype)
            states = torch.randn(len(lens) + 1, hv, dk, dv, device=dev) * 0.1
            cu, idx = _cu(lens, dev), torch.arange(1, len(lens) + 1, dtype=torch.int32, device=dev)
            init = torch.ones(len(lens), dtype=torch.bool, device=dev)

            def chunked(module, s, args=(q, k, v, g, beta, cu), idx=idx, init=init):
                return module.gated_delta_rule_chunked(*args, s, idx, init, True)

            # Chunked (UT-transform) form per token and value head: 5*C*Dk + 3*C*Dv + 6*Dk*Dv.
            flops = sum(lens) * hv * (5 * c * dk + 3 * c * dv + 6 * dk * dv)
            yield Case("gated_delta_rule_chunked", f"{model} x{dk} {len(lens)}x{max(lens)}",
                       partial(chunked, ops, states),
                       partial(_state_check, partial(chunked, ops), partial(chunked, reference_linear_attn), states),
                       nbytes(q, k, v) + nbytes(v) + nbytes(g, beta) + 2 * len(lens) * hv * dk * dv * 4, flops)
        for batch in [3] if smoke else [1, 64, 256]:
            q, k, v, g, beta = _gdr_inputs(batch, heads, dev, dtype)
            states = torch.randn(batch, hv, dk, dv, device=dev) * 0.1
            idx = torch.randperm(batch, device=dev).to(torch.int32)

            def recurrent(module, s, args=(q, k, v, g, beta), idx=idx):
                return module.gated_delta_rule_recurrent(*args, s, idx, True)

            yield Case("gated_delta_rule_recurrent", f"{model} x{dk} B={batch}",
                       partial(recurrent, ops, states),
                       partial(_state_check, partial(recurrent, ops), partial(recurrent, reference_linear_attn),
                               states),
                       nbytes(q, k, v) + nbytes(v) + nbytes(g, beta) + 2 * nbytes(states), 6 * batch * hv * dk * dv)


def gated_norm_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    for model, (_, hv, _, dv) in _linear_shapes(smoke):
        weight = torch.randn(dv, device=dev, dtype=dtype)
        for t in [3] if smoke else [1, 256, 4096, 16384]:
            x = torch.randn(t, hv, dv, device=dev, dtype=dtype)
            z = torch.randn_like(x)
            yield Case("gated_rms_norm", f"{model} T={t} [{hv},{dv}]", partial(ops.gated_rms_norm, x, z, weight, EPS),
                       lambda x=x, z=z, w=weight: rel_err(ops.gated_rms_norm(x, z, w, EPS),
                                                          reference_linear_attn.gated_rms_norm(x, z, w, EPS)),
                       3 * nbytes(x) + nbytes(weight))


QWEN3_5_HIDDEN = 1024  # configs/models/qwen3.5-0.8b.json text_config.hidden_size
QWEN3_5_ATTN = (8, 256)  # the same file's num_attention_heads, head_dim


def _composed_offset_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernels an fp32-weight (Qwen3.5) norm ran before the op took that weight."""
    r.add_(x)
    return torch.nn.functional.rms_norm(r.float(), (r.shape[-1],), w, EPS).to(r.dtype)


def _composed_gating(ba: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor):
    """The kernels GatedDeltaNet's gating ran before gdn_gating (beta.float(): the delta-rule wrapper's)."""
    b, a = ba.split(a_log.shape[0], dim=-1)
    return -a_log.exp() * torch.nn.functional.softplus(a + dt_bias), b.sigmoid().float()


def fusion_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    """Qwen3.5-0.8B decode pieces, the composed torch path next to the one op: the offset
    norm (fused add + norm, fp32 `1 + w`), the Gated DeltaNet gating and the attention output gate."""
    hidden, hv = (64, 4) if smoke else (QWEN3_5_HIDDEN, LINEAR["0.8B"][1])
    for t in [3] if smoke else [1, 64]:
        x = torch.randn(t, hidden, device=dev, dtype=dtype)
        r, w = torch.randn_like(x), 1 + 0.3 * torch.randn(hidden, device=dev)
        norm_bytes = 4 * nbytes(x) + nbytes(w)
        # The timed calls write x and r: each row and its check keep their own copies.
        x_old, r_old, expected_x = x.clone(), r.clone(), x.clone()
        reference.fused_add_rms_norm(expected_x, r.clone(), w, EPS)
        yield Case("fused_add_rms_norm", f"0.8B fp32 w T={t} H={hidden}", partial(ops.fused_add_rms_norm, x, r, w, EPS),
                   partial(_in_place_check, partial(_fused, ops, w), partial(_fused, reference, w), x, r), norm_bytes)
        yield Case("  composed (old)", f"0.8B fp32 w T={t} H={hidden}", partial(_composed_offset_norm, x_old, r_old, w),
                   lambda x=x_old.clone(), r=r_old.clone(), w=w, e=expected_x: rel_err(_composed_offset_norm(x, r, w), e),
                   norm_bytes)
        ba = torch.randn(t, 2 * hv, device=dev, dtype=dtype) * 4
        a_log, dt_bias = torch.rand(hv, device=dev) * 2.7, torch.randn(hv, device=dev)
        gate_bytes = nbytes(ba, a_log, dt_bias) + 2 * t * hv * 4
        expected = reference_linear_attn.gdn_gating(ba, a_log, dt_bias)

        def gating_err(fn, args=(ba, a_log, dt_bias), expected=expected) -> float:
            return max(rel_err(a, b) for a, b in zip(fn(*args), expected))

        yield Case("gdn_gating", f"0.8B T={t} Hv={hv}", partial(ops.gdn_gating, ba, a_log, dt_bias),
                   partial(gating_err, ops.gdn_gating), gate_bytes)
        yield Case("  composed (old)", f"0.8B T={t} Hv={hv}", partial(_composed_gating, ba, a_log, dt_bias),
                   partial(gating_err, _composed_gating), gate_bytes)
        # Full-attention output gate: attn [T, Hq, D] times sigmoid of the gate half of q_proj's heads.
        hq, d = (2, 16) if smoke else QWEN3_5_ATTN
        attn = torch.randn(t, hq, d, device=dev, dtype=dtype)
        gate = torch.randn(t, hq * 2 * d + 2 * 2 * d, device=dev, dtype=dtype)[:, : hq * 2 * d].view(t, hq, 2 * d)[..., d:]
        want = reference.sigmoid_gate_mul(attn, gate)
        yield Case("sigmoid_gate_mul", f"0.8B T={t} [{hq},{d}]", partial(ops.sigmoid_gate_mul, attn, gate),
                   lambda a=attn, g=gate, e=want: rel_err(ops.sigmoid_gate_mul(a, g), e), 3 * nbytes(attn))
        yield Case("  composed (old)", f"0.8B T={t} [{hq},{d}]", lambda a=attn, g=gate: a * torch.sigmoid(g),
                   lambda a=attn, g=gate, e=want: rel_err(a * torch.sigmoid(g), e), 3 * nbytes(attn))


def _gdn_layer(batch: int, heads: tuple[int, int, int, int], dev: str, dtype: torch.dtype):
    """A decode step's in_proj output and one layer's weights; state pools with one slot per sequence."""
    hk, hv, dk, dv = heads
    conv_dim = 2 * hk * dk + hv * dv
    proj = torch.randn(batch, conv_dim + hv * dv + 2 * hv, device=dev, dtype=dtype)
    weights = (torch.randn(conv_dim, CONV_WIDTH, device=dev, dtype=dtype) * 0.5, torch.rand(hv, device=dev) * 2.7,
               torch.randn(hv, device=dev), torch.randn(dv, device=dev, dtype=dtype))
    states = (torch.randn(batch, conv_dim, CONV_WIDTH - 1, device=dev, dtype=dtype),
              torch.randn(batch, hv, dk, dv, device=dev) * 0.1)
    return proj, weights, states, torch.randperm(batch, device=dev).to(torch.int32)


def _gdn_fused(module, conv_s, rec_s, proj, weights, idx):
    conv_w, a_log, dt_bias, norm_w = weights
    return module.gated_delta_net_decode(proj, conv_w, conv_s, a_log, dt_bias, rec_s, idx, norm_w, EPS, True)


def _gdn_four_ops(conv_s, rec_s, proj, weights, idx):
    """The decode step as four ops (gating, conv update, recurrent step, gated norm)."""
    conv_w, a_log, dt_bias, norm_w = weights
    batch, hv, dk, dv = proj.shape[0], rec_s.shape[1], rec_s.shape[2], rec_s.shape[3]
    key_dim = (conv_w.shape[0] - hv * dv) // 2
    mixed, z, ba = proj.split([conv_w.shape[0], hv * dv, 2 * hv], dim=-1)
    g, beta = ops.gdn_gating(ba, a_log, dt_bias)
    q, k, v = ops.causal_conv1d_update(mixed, conv_w, None, conv_s, idx, True).split([key_dim, key_dim, hv * dv], -1)
    out = ops.gated_delta_rule_recurrent(q.view(batch, -1, dk), k.view(batch, -1, dk), v.view(batch, hv, dv),
                                         g, beta, rec_s, idx, True)
    return ops.gated_rms_norm(out, z.view(batch, hv, dv), norm_w, EPS)


def gdn_decode_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    """gated_delta_net_decode next to the four ops it replaces; bytes: the conv and recurrent states
    read and written, the projection read and the output written (the states dominate)."""
    for model, heads in _linear_shapes(smoke):
        for batch in [3] if smoke else [1, 64]:
            proj, weights, states, idx = _gdn_layer(batch, heads, dev, dtype)
            args = dict(proj=proj, weights=weights, idx=idx)
            moved = 2 * nbytes(*states) + nbytes(proj, weights[0]) + batch * heads[1] * heads[3] * proj.element_size()
            expected = partial(_gdn_fused, reference_linear_attn, **args)
            fused = partial(_gdn_fused, ops, **args)
            yield Case("gated_delta_net_decode", f"{model} B={batch}", partial(fused, *states),
                       partial(_state_check, fused, expected, *states), moved)
            four = partial(_gdn_four_ops, **args)
            yield Case("  four ops (old)", f"{model} B={batch}", partial(four, *states),
                       partial(_state_check, four, expected, *states), moved)


FAMILIES = {
    "rms_norm": norm_cases, "rotary_embedding": rotary_cases, "activation": activation_cases,
    "reshape_and_cache": cache_cases, "paged_attention_decode": decode_cases,
    "varlen_attention": varlen_cases, "topk_softmax": topk_cases, "moe_experts": moe_cases,
    "moe_decode": moe_decode_cases,
    "causal_conv1d": conv1d_cases, "gated_delta_rule": delta_rule_cases, "gated_rms_norm": gated_norm_cases,
    "qwen3_5_fusions": fusion_cases, "qk_norm_rope": qk_norm_rope_cases,
    "qk_norm_rope_and_cache": qk_norm_rope_cache_cases,
    "gated_delta_net_decode": gdn_decode_cases, "linear_small": linear_small_cases,
    "add_rms_norm_linear_small": norm_linear_cases,
}


def time_case(case: Case, dev: str, smoke: bool) -> float:
    """Mean milliseconds per call on the device.

    On CUDA the calls are captured in a CUDA graph and the replay is timed with
    events, so host overhead (Python wrapper, dispatcher, launch) is excluded and
    the number is kernel time; eager timing is the fallback if capture fails.
    On CPU (smoke) one wall-clock call.
    """
    if smoke or dev != "cuda":
        start = time.perf_counter()
        case.run()
        return (time.perf_counter() - start) * 1e3
    once = cuda_time_fn(case.run, warmup=3, iters=3)
    iters = int(min(200, max(10, 50.0 / max(once, 1e-3))))
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                case.run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                case.run()
    except RuntimeError as exc:  # not capturable: eager timing includes host overhead
        print(f"  (eager timing, graph capture failed: {exc})", flush=True)
        return cuda_time_fn(case.run, warmup=10, iters=iters)
    return cuda_time_fn(graph.replay, warmup=2, iters=5) / iters


def run(families: list[str], dev: str, dtype: torch.dtype, smoke: bool, copy_gbps: float, mm_tflops: float,
        attn_sm90: Sequence[bool | None] = (None,), decode_merge: Sequence[bool | None] = (None,),
        shapes: Sequence[str] = ()) -> list[Row]:
    """Check and time every case of `families` (only those whose shape contains one of `shapes`, if
    any); varlen_attention's once per `attn_sm90` setting and paged_attention_decode's once per
    `decode_merge` setting (None: the process's, unlabelled), the settings of one case on adjacent rows."""
    switches = {"varlen_attention": (attn_sm90, ops.attention_sm90, "sm90"),
                "paged_attention_decode": (decode_merge, ops.decode_fused_merge, "fused-merge")}
    rows = []
    for family in families:
        settings, switch, label = switches.get(family, ((None,), None, ""))
        for case in FAMILIES[family](dev, dtype, smoke):
            if shapes and not any(s in case.shape for s in shapes):
                continue
            for setting in settings:
                with switch(setting) if setting is not None else contextlib.nullcontext():
                    err = case.check()
                    ms = time_case(case, dev, smoke)
                shape = case.shape if setting is None else f"{case.shape} {label}={'on' if setting else 'off'}"
                gbps = case.bytes / (ms * 1e-3) / 1e9
                tflops = case.flops / (ms * 1e-3) / 1e12
                row = Row(case.op, shape, ms * 1e3, gbps, 100 * gbps / copy_gbps, tflops,
                          100 * tflops / mm_tflops if case.flops else float("nan"), err)
                print(f"{row.op:<24} {row.shape:<36} {row.us:10.1f} us {gbps:8.1f} GB/s "
                      f"{tflops:7.1f} TFLOP/s  err {err:.2e}", flush=True)
                rows.append(row)
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="each op once at tiny size (CPU is fine)")
    parser.add_argument("--ops", nargs="*", choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--json", default=None, help="write the rows and machine peaks here")
    parser.add_argument("--attn-sm90", nargs="*", default=[], help=ATTN_SM90_HELP)
    parser.add_argument("--decode-merge", nargs="*", default=[],
                        help="paged decode's fused partition merge settings to time, side by side: on,off "
                             "(default: the process's, SPLITVL_DECODE_FUSED_MERGE)")
    parser.add_argument("--shapes", nargs="*", default=[],
                        help="only the cases whose shape contains one of these strings (e.g. 30B-A3B 'B=1 ')")
    args = parser.parse_args(argv)
    try:
        attn_sm90 = attn_sm90_settings(args.attn_sm90)
        decode_merge = on_off_settings(args.decode_merge, "--decode-merge") or [None]
    except ValueError as exc:
        parser.error(str(exc))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and dev != "cuda":
        parser.error("the full benchmark needs a CUDA device (use --smoke on CPU)")
    default = "fp32" if dev == "cpu" else "bf16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or default]
    torch.manual_seed(0)
    peaks = measure_peaks(torch.device(dev)) if not args.smoke else None
    copy_gbps = peaks.copy_gbps if peaks else float("nan")
    mm_tflops = peaks.matmul_tflops if peaks else float("nan")
    print(f"device {peaks.device_name if peaks else dev}  dtype {dtype}  kernels "
          f"{'compiled' if ops.extension_available() else 'REFERENCE (' + str(ops.fallback_reason()) + ')'}")
    print(f"copy {copy_gbps:,.0f} GB/s (read+write)  bf16 mm {mm_tflops:,.0f} TFLOP/s", flush=True)
    rows = run(args.ops, dev, dtype, args.smoke, copy_gbps, mm_tflops, attn_sm90, decode_merge, args.shapes)
    bad = [r for r in rows if not r.rel_err <= TOLERANCE[dtype]]
    headers = ["op", "shape", "us", "GB/s", "% copy", "TFLOP/s", "% mm", "rel err"]
    print_table(f"splitvl ops, {peaks.device_name if peaks else dev}, {dtype}, copy {copy_gbps:,.0f} GB/s, "
                f"bf16 mm {mm_tflops:,.0f} TFLOP/s", headers,
                [(r.op, r.shape, r.us, r.gbps, r.pct_copy, r.tflops if r.tflops else "",
                  r.pct_mm if r.tflops else "", f"{r.rel_err:.1e}") for r in rows])
    write_json(args.json, {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": peaks.device_name if peaks else dev, "dtype": str(dtype),
        "copy_gbps": copy_gbps, "matmul_tflops": mm_tflops,
        "compiled": ops.extension_available(), "rows": [asdict(r) for r in rows],
    })
    for r in bad:
        print(f"MISMATCH: {r.op} {r.shape}: relative error {r.rel_err:.2e} > {TOLERANCE[dtype]:.0e}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
