"""The vision tower's attention: our `varlen_attention` vs torch's SDPA backends, same inputs, same run.

    python -m bench.vit_attention --json $OUT/vit_attention.json   # GPU: ViT shapes of the 2B / 8B towers
    python -m bench.vit_attention --smoke                          # CPU: tiny shapes, the math backend

What transformers' Qwen3-VL tower runs (sdpa over each image's patches) is the peer:
bidirectional attention over `images` segments of `tokens` patches each, 16 heads of
head_dim 64 (2B tower) or 72 (8B / 30B-A3B towers). Ours takes the packed segments
with cu_seqlens in one launch; SDPA takes them as a batch of equal-length images
([images, heads, tokens, head_dim]), one launch per backend: flash attention,
cuDNN, memory-efficient (GPU), math (CPU smoke); and torch's packed `varlen_attn` (GPU,
where this torch has it), which takes the same packed layout as ours. Per row: device ms (CUDA events),
TFLOP/s (4 x tokens^2 x head_dim x heads x images) and the max error against
SDPA's math backend in fp32 on the same bf16 inputs. A backend that refuses the
shape prints its reason instead of a time.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

import ops
from bench.common import cuda_time_fn, print_table, time_fn, write_json
from models.qwen3_vl.vision import torch_varlen_attention

GPU_SHAPES = [(d, n, s) for d in (64, 72) for n, s in ((1, 4096), (8, 4096), (4, 1024))]
SMOKE_SHAPES = [(8, 2, 24), (24, 1, 40)]  # (head_dim, images, tokens)
HEADS = 16


def backends(device: torch.device) -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"sdpa math": SDPBackend.MATH}
    return {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa(backend: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def run_shape(head_dim: int, images: int, tokens: int, heads: int, device: torch.device,
              dtype: torch.dtype) -> list[dict]:
    """One row per implementation for one shape."""
    from torch.nn.attention import SDPBackend

    gen = torch.Generator(device="cpu").manual_seed(head_dim * 1000 + tokens)
    q, k, v = (torch.randn(images * tokens, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    cu = torch.arange(images + 1, dtype=torch.int32, device=device) * tokens
    batched = [x.view(images, tokens, heads, head_dim).transpose(1, 2) for x in (q, k, v)]
    ref = sdpa(SDPBackend.MATH, *(x.float() for x in batched)).transpose(1, 2).reshape(images * tokens, heads, head_dim)
    flops = 4 * images * tokens * tokens * head_dim * heads
    timer: Callable[[Callable[[], object]], float] = (
        cuda_time_fn if device.type == "cuda" else lambda fn: time_fn(fn, device, warmup=1, iters=3))
    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: ops.varlen_attention(q, k, v, cu, cu, tokens, tokens, head_dim**-0.5, False)}
    for name, backend in backends(device).items():
        candidates[name] = lambda b=backend: sdpa(b, *batched).transpose(1, 2).reshape(images * tokens, heads, head_dim)
    varlen = torch_varlen_attention()
    if varlen is not None and device.type == "cuda":
        candidates["torch varlen_attn"] = lambda: varlen(q, k, v, cu, tokens, head_dim**-0.5)
    rows = []
    for name, fn in candidates.items():
        row = {"impl": name, "head_dim": head_dim, "images": images, "tokens": tokens}
        try:
            err = (fn().float() - ref).abs().max().item()
            ms = timer(fn)
        except RuntimeError as exc:  # a backend that does not take this shape or dtype
            rows.append({**row, "error": str(exc).splitlines()[0][:80]})
            continue
        rows.append({**row, "ms": ms, "tflops": flops / ms / 1e9, "max_err": err})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes, heads = (SMOKE_SHAPES, 2) if device.type == "cpu" else (GPU_SHAPES, HEADS)
    rows = [row for d, n, s in shapes for row in run_shape(d, n, s, heads, device, dtype)]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print_table(f"ViT attention, {heads} heads, bidirectional, {dtype}, {name}",
                ["impl", "head_dim", "images x tokens", "ms", "TFLOP/s", "max err vs fp32"],
                [[r["impl"], r["head_dim"], f"{r['images']} x {r['tokens']}",
                  r.get("ms", r.get("error", "")), r.get("tflops", ""), r.get("max_err", "")] for r in rows])
    write_json(args.json, {"device": name, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
