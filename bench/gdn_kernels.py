"""Per-kernel GPU time of the chunked Gated DeltaNet prefill (`ops.gated_delta_rule_chunked`).

    python -m bench.gdn_kernels                           # H200: the 0.8B shape, 1x256 .. 1x16384 tokens and
                                                          # the serving mix 2x1047+32x1 (decode rows)
    python -m bench.gdn_kernels --device cpu --lens 64,1x70 --heads 2,4,16,40   # a CPU check of the script

Each case is warmed up, then `--iters` calls run under torch.profiler; the table lists every
kernel's time per call (chunk offsets, prepare, state pass, output, and the sequential kernel that runs
sequences of <= 4 tokens) and the call's wall time from
CUDA events, so it says which of the phases holds the total.
"""

from __future__ import annotations

import argparse

import torch

import ops
from bench.common import cuda_time_fn, print_table
from bench.ops import LINEAR, _cu, _gdr_inputs
from bench.profile import kernel_table, make_profiler


def parse_lens(spec: str) -> list[tuple[str, list[int]]]:
    """'1x4096,2x1047+32x1,70' -> [('1x4096', [4096]), ('2x1047+32x1', [1047] * 2 + [1] * 32), ('70', [70])]:
    a case per comma, '+' packs groups into one call (a mixed step: prompts and one-token decode rows)."""
    out = []
    for case in spec.split(","):
        lens = []
        for group in case.split("+"):
            count, _, length = group.rpartition("x")
            lens += [int(length)] * int(count or 1)
        out.append((case, lens))
    return out


def profile_case(lens: list[int], heads: tuple[int, int, int, int], device: str, dtype: torch.dtype,
                 iters: int) -> tuple[list[dict], float]:
    """(kernel rows per call, wall ms per call) of one packed batch of sequences."""
    hk, hv, dk, dv = heads
    q, k, v, g, beta = _gdr_inputs(sum(lens), heads, device, dtype)
    states = torch.randn(len(lens) + 1, hv, dk, dv, device=device) * 0.1
    cu = _cu(lens, device)
    idx = torch.arange(1, len(lens) + 1, dtype=torch.int32, device=device)
    init = torch.ones(len(lens), dtype=torch.bool, device=device)

    def call() -> torch.Tensor:
        return ops.gated_delta_rule_chunked(q, k, v, g, beta, cu, states, idx, init, True)

    wall_ms = cuda_time_fn(call) if device == "cuda" else float("nan")
    with make_profiler(torch.device(device)) as prof:
        for _ in range(iters):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
    rows, _ = kernel_table(prof, torch.device(device), iters)
    return rows, wall_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lens", default="1x256,1x1047,2x1047+32x1,3x700,1x4096,4x1024,1x16384",
                        help="COUNTxLEN[+COUNTxLEN],... sequences per case (1,047: an image-chat prompt)")
    parser.add_argument("--heads", default=",".join(map(str, LINEAR["0.8B"])), help="Hk,Hv,Dk,Dv")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    heads = tuple(int(x) for x in args.heads.split(","))
    dtype = getattr(torch, args.dtype)
    for name, lens in parse_lens(args.lens):
        rows, wall_ms = profile_case(lens, heads, args.device, dtype, args.iters)
        print_table(f"gated_delta_rule_chunked {name} heads={heads}: {wall_ms * 1e3:.1f} us/call",
                    ["kernel", "us/call", "calls", "share"],
                    [[r["name"][:80], r["us_per_step"], r["calls"], f"{100 * r['share']:.1f}%"] for r in rows])


if __name__ == "__main__":
    main()
