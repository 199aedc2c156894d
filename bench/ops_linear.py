"""bench/ops.py family `linear_small`: the decoders' dense linears at decode rows.

Each shape runs at M = 1, 4 and 16 rows as `ops.linear_small` (or `ops.gate_up_silu_small`
for a SwiGLU gate_up) and as what it replaces, F.linear on cuBLAS (+ `ops.silu_and_mul`),
in the same run. Shapes (K, N) come from configs/models/*.json:
- Qwen3.5-0.8B (hidden 1024, intermediate 3584; 8/2 heads x 256 with the output gate fused
  into q; Gated DeltaNet 16/16 heads x 128, in_proj = q, k, v, z, b, a; vocab 248,320);
- Qwen3-VL-30B-A3B (hidden 2048; 32/4 heads x 128; router over 128 experts);
- Qwen3-VL-8B (hidden 4096, intermediate 12288; 32/8 heads x 128).
A decode step reads each layer's weights once, so the timed calls cycle through enough
copies of the weight to pass the L2 cache (50 MB): the rows are DRAM rates, and their
bytes are the weight's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F

import ops
from bench.op_case import Case, nbytes, rel_err
from ops import reference

# (model, layer, K, N, gated): gated N is the intermediate size I (weight [2I, K]).
SHAPES = [
    ("0.8B", "attn qkv+gate", 1024, 5120, False), ("0.8B", "attn o_proj", 2048, 1024, False),
    ("0.8B", "gdn in_proj", 1024, 8224, False), ("0.8B", "gdn out_proj", 2048, 1024, False),
    ("0.8B", "mlp gate_up", 1024, 3584, True), ("0.8B", "mlp down", 3584, 1024, False),
    ("0.8B", "lm_head", 1024, 248320, False),
    ("30B-A3B", "attn qkv", 2048, 5120, False), ("30B-A3B", "attn o_proj", 4096, 2048, False),
    ("30B-A3B", "moe router", 2048, 128, False),
    ("8B", "attn qkv", 4096, 6144, False), ("8B", "attn o_proj", 4096, 4096, False),
    ("8B", "mlp gate_up", 4096, 12288, True), ("8B", "mlp down", 12288, 4096, False),
]
SMOKE_SHAPES = [("tiny", "linear", 64, 40, False), ("tiny", "gate_up", 64, 24, True)]
L2_PASS_BYTES = 128 << 20  # well past the H200's 50 MB L2


def _cycled(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
            weights: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A call of fn(x, w) on the next weight copy each time (graph capture records the cycle)."""
    copies = itertools.cycle(weights)
    return lambda: fn(x, next(copies))


def _composed_gate_up(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ops.silu_and_mul(F.linear(x, w))


def _check(run: Callable[[], torch.Tensor], expected: Callable[[], torch.Tensor]) -> float:
    return rel_err(run(), expected())


def linear_small_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    for model, layer, k, n, gated in SMOKE_SHAPES if smoke else SHAPES:
        weight = torch.randn(2 * n if gated else n, k, device=dev, dtype=dtype) / k**0.5
        count = max(1, min(32, L2_PASS_BYTES // nbytes(weight)))
        copies = [weight] + [weight.clone() for _ in range(count - 1)]
        paths = (("gate_up_silu_small", ops.gate_up_silu_small), ("  F.linear+silu_and_mul", _composed_gate_up)) \
            if gated else (("linear_small", ops.linear_small), ("  F.linear (cuBLAS)", F.linear))
        for m in (1, 3) if smoke else (1, 4, 16):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            expected = partial(reference.gate_up_silu_small if gated else reference.linear_small, x, weight)
            moved = nbytes(weight, x) + m * n * dtype.itemsize
            for op, fn in paths:
                run = _cycled(fn, x, copies)
                yield Case(op, f"{model} {layer} M={m} K={k} N={n}", run, partial(_check, run, expected), moved)


# (model, K, N): the qkv projections whose input norm add_rms_norm_linear_small folds in.
NORM_QKV_SHAPES = [("30B-A3B", 2048, 5120), ("8B", 4096, 6144)]
SMOKE_NORM_QKV_SHAPES = [("tiny", 64, 40)]
EPS = 1e-6


def _norm_then(linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], norm_w: torch.Tensor,
               x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fused_add_rms_norm in place (the decoder's own x and residual), then the linear."""
    ops.fused_add_rms_norm(x, r, norm_w, EPS)
    return linear(x, w)


def norm_linear_cases(dev: str, dtype: torch.dtype, smoke: bool) -> Iterator[Case]:
    """`add_rms_norm_linear_small` (one launch) next to the two launches it replaces, with the
    qkv on the weight stream (linear_small) or on cuBLAS (the decoders' qkv today); weights
    cycled past L2 as in `linear_small_cases`, bytes the weight's plus the rows'. Every CTA
    reads all M rows of x and the residual for the norm, so the rows at M = 4 and 16 say up
    to where the fold pays (`models.layers.linear.NORM_FOLD_ROWS`)."""
    for model, k, n in SMOKE_NORM_QKV_SHAPES if smoke else NORM_QKV_SHAPES:
        weight = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
        norm_w = 1 + 0.1 * torch.randn(k, device=dev, dtype=dtype)
        count = max(1, min(32, L2_PASS_BYTES // nbytes(weight)))
        copies = [weight] + [weight.clone() for _ in range(count - 1)]
        for m in (1, 3) if smoke else (1, 4, 16):
            x, r = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(m, k, device=dev, dtype=dtype)
            moved = nbytes(weight, x, r, norm_w) + m * (n + k) * dtype.itemsize
            fused = _cycled(lambda x_, w_, r=r: ops.add_rms_norm_linear_small(x_, r, norm_w, EPS, w_)[0], x, copies)
            expected = lambda x=x, r=r: reference.add_rms_norm_linear_small(x, r, norm_w, EPS, weight)[0]  # noqa: E731
            label = f"{model} qkv M={m} K={k} N={n}"
            yield Case("add_rms_norm_linear_small", label, fused,
                       lambda x=x, r=r: rel_err(ops.add_rms_norm_linear_small(x, r, norm_w, EPS, weight)[0],
                                                expected()), moved)
            for name, linear in (("  fused_add_rms_norm+linear_small", ops.linear_small),
                                 ("  fused_add_rms_norm+F.linear", F.linear)):
                xs, rs = x.clone(), r.clone()  # updated in place on every call
                run = _cycled(lambda x_, w_, rs=rs, linear=linear: _norm_then(linear, norm_w, x_, rs, w_), xs, copies)

                def check(linear=linear, x=x, r=r) -> float:
                    xc, rc = x.clone(), r.clone()
                    return rel_err(_norm_then(linear, norm_w, xc, rc, weight), expected())

                yield Case(name, label, run, check, moved)
