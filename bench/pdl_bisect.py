"""Which decode-op sequence breaks under programmatic dependent launch (PDL): one GPU command.

Runs short chains of the ops that tests/ops/test_pdl.py's dense and attention chains use, in
their shapes, eagerly with PDL off (the reference), eagerly with PDL on, and as a captured CUDA
graph with PDL on, and prints every sequence whose outputs or in-place buffers differ bit for
bit. Dense part: every ordered pair and triple of single-kernel stages whose dims chain, at 1
and 3 rows, ITERS iterations with the data changing every one (the previous output feeds the
next iteration where the dims allow, else a fresh input). Attention part: the attention link
with each subset of its kernels after the QKV projection, at a context that runs the
split-partition merge and at one that does not.

Usage: python -m bench.pdl_bisect [--iters N]   (as a module: bench/ops.py would shadow the ops package)
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import ops

H, INTER = 2048, 1536


@dataclass(frozen=True, slots=True)
class Stage:
    """One kernel: [rows, d_in] -> [rows, d_out]."""

    name: str
    d_in: int
    d_out: int
    fn: Callable[[torch.Tensor], torch.Tensor]


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


def dense_stages(residual: torch.Tensor) -> list[Stage]:
    """The dense chain's kernels (weights of tests/ops/test_pdl.py's shapes)."""
    w_hh, w_gu = _randn(H, H, scale=H**-0.5), _randn(2 * INTER, H, scale=H**-0.5)
    w_down, w_small = _randn(H, INTER, scale=INTER**-0.5), _randn(H, H, scale=H**-0.5)
    n1, n2 = torch.rand(H, device="cuda") + 0.5, _randn(H).abs() + 0.5

    def add_norm(x: torch.Tensor) -> torch.Tensor:
        ops.fused_add_rms_norm(x, residual, n2, 1e-6)
        return x

    return [
        Stage("rms_norm", H, H, lambda x: ops.rms_norm(x, n1, 1e-6)),
        Stage("add_rms_norm", H, H, add_norm),
        Stage("linear_K2048", H, H, lambda x: ops.linear_small(x, w_hh, None)),
        Stage("linear_K1024", H, H, lambda x: ops.linear_small(x[:, :1024], w_small[:, :1024], None)),
        Stage("gate_up_silu", H, INTER, lambda x: ops.gate_up_silu_small(x, w_gu)),
        Stage("linear_gate_up", H, 2 * INTER, lambda x: ops.linear_small(x, w_gu, None)),
        Stage("silu_and_mul", 2 * INTER, INTER, ops.silu_and_mul),
        Stage("linear_down_K1536", INTER, H, lambda x: ops.linear_small(x, w_down, None)),
        Stage("sigmoid_gate_mul", H, H, lambda x: ops.sigmoid_gate_mul(x, x)),
    ]


def chains(stages: list[Stage], length: int) -> list[tuple[Stage, ...]]:
    return [seq for seq in itertools.product(stages, repeat=length)
            if all(a.d_out == b.d_in for a, b in zip(seq, seq[1:]))]


def run(link: Callable[[int], torch.Tensor], buffers: list[torch.Tensor], iters: int, pdl: bool,
        graph: bool) -> list[torch.Tensor]:
    """Every iteration's output and the in-place buffers after `iters` links from their initial values."""
    initial = [b.clone() for b in buffers]
    outs: list[torch.Tensor] = []

    def chain() -> None:
        for i in range(iters):
            outs.append(link(i))

    with ops.programmatic_launch(pdl):
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain()
            for b, init in zip(buffers, initial):
                b.copy_(init)
            g.replay()
        else:
            chain()
    torch.cuda.synchronize()
    result = [o.clone() for o in outs] + [b.clone() for b in buffers]
    for b, init in zip(buffers, initial):
        b.copy_(init)
    return result


def mismatches(link: Callable[[int], torch.Tensor], buffers: list[torch.Tensor], iters: int) -> list[str]:
    """'eager' / 'graph' for each PDL mode whose results differ from eager without PDL."""
    want = run(link, buffers, iters, pdl=False, graph=False)
    bad = []
    for graph in (False, True):
        got = run(link, buffers, iters, pdl=True, graph=graph)
        diff = [i for i, (g, w) in enumerate(zip(got, want)) if not torch.equal(g, w)]
        if diff:
            kind = "graph" if graph else "eager"
            bad.append(f"{kind}: {len(diff)}/{len(want)} tensors differ (first {diff[0]})")
    return bad


def dense_link(seq: tuple[Stage, ...], inputs: dict[int, list[torch.Tensor]]) -> Callable[[int], torch.Tensor]:
    state: dict[str, torch.Tensor] = {}

    def link(i: int) -> torch.Tensor:
        prev = state.get("x") if i > 0 else None
        x = prev if prev is not None and prev.shape[1] == seq[0].d_in else inputs[seq[0].d_in][i]
        if seq[0].name == "add_rms_norm" and x is inputs[seq[0].d_in][i]:
            x = x.clone()  # in place: never overwrite the shared fresh inputs
        for stage in seq:
            x = stage.fn(x)
        state["x"] = x
        return x

    return link


def bisect_dense(iters: int) -> list[str]:
    report = []
    for rows in (1, 3):
        torch.manual_seed(rows)
        residual = _randn(rows, H)
        stages = dense_stages(residual)
        inputs = {d: [_randn(rows, d) for _ in range(iters)] for d in (H, INTER, 2 * INTER)}
        for length in (1, 2, 3):
            for seq in chains(stages, length):
                bad = mismatches(dense_link(seq, inputs), [residual], iters)
                if bad:
                    report.append(f"rows={rows} {' -> '.join(s.name for s in seq)}: {'; '.join(bad)}")
    return report


def split_qkv(a: AttentionSetup, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The projection's q, output gate, k, v. Shapes: qkv [B, (2 hq + 2 hkv) d] -> [B, hq, d] x 2, [B, hkv, d] x 2."""
    q_gate, k, v = qkv.split([2 * a.hq * a.d, a.hkv * a.d, a.hkv * a.d], dim=-1)
    q_gate = q_gate.view(a.batch, a.hq, 2 * a.d)
    return q_gate[..., :a.d], q_gate[..., a.d:], k.unflatten(-1, (a.hkv, a.d)), v.unflatten(-1, (a.hkv, a.d))


ATTN_KERNELS = ("qk_norm_rope", "reshape_and_cache", "paged_decode", "sigmoid_gate_mul", "linear_o")


@dataclass(frozen=True, slots=True)
class AttentionSetup:
    """The attention link's weights, paged KV cache and per-link positions / slots / lengths
    (2 sequences, 8 query and 2 KV heads of 256, hidden 1,024, 16-token blocks); shared with
    tests/ops/test_pdl.py. Made before any capture: every link's inputs exist up front."""

    batch: int
    hq: int
    hkv: int
    d: int
    h: int
    w_qkv: torch.Tensor
    w_o: torch.Tensor
    qw: torch.Tensor
    kw: torch.Tensor
    cos_sin: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    tables: torch.Tensor
    positions: list[torch.Tensor]
    slots: list[torch.Tensor]
    lens: list[torch.Tensor]


def attention_setup(context: int, links: int, second_start: int) -> AttentionSetup:
    """Sequence 0 starts at `context` tokens, sequence 1 at `second_start`; one new token per link."""
    batch, hq, hkv, d, h, block = 2, 8, 2, 256, 1024, 16
    blocks_per_seq = (context + links) // block + 1
    w_qkv = _randn((2 * hq + 2 * hkv) * d, h, scale=h**-0.5)
    w_o = _randn(h, hq * d, scale=(hq * d) ** -0.5)
    qw, kw = torch.rand(d, device="cuda") + 0.5, torch.rand(d, device="cuda") + 0.5
    rot = d // 4
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot))
    freqs = torch.outer(torch.arange(context + links, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    key_cache = _randn(batch * blocks_per_seq, block, hkv, d)
    value_cache = _randn(batch * blocks_per_seq, block, hkv, d)
    tables = torch.arange(batch * blocks_per_seq, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    starts = torch.tensor([context, second_start], device="cuda")
    positions = [starts + i for i in range(links)]
    rows = torch.arange(batch, device="cuda")
    slots = [(tables[rows, (p // block)].long() * block + p % block) for p in positions]
    lens = [(p + 1).int() for p in positions]
    return AttentionSetup(batch, hq, hkv, d, h, w_qkv, w_o, qw, kw, cos_sin, key_cache, value_cache, tables,
                          positions, slots, lens)


def attention_link(use: frozenset[str], context: int, iters: int):
    """tests/ops/test_pdl.py's attention link with only the kernels in `use` after the QKV projection."""
    a = attention_setup(context, iters, context - context // 3)
    d = a.d
    inputs = [_randn(a.batch, a.h) for _ in range(iters)]
    state: dict[str, torch.Tensor] = {}

    def link(i: int) -> torch.Tensor:
        x = state["x"] if i > 0 and state["x"].shape == inputs[i].shape else inputs[i]
        q, gate, k, v = split_qkv(a, ops.linear_small(x, a.w_qkv, None))
        if "qk_norm_rope" in use:
            ops.qk_norm_rope(a.positions[i], q, k, a.qw, a.kw, 1e-6, a.cos_sin, True, None, False)
        if "reshape_and_cache" in use:
            ops.reshape_and_cache(k, v, a.key_cache, a.value_cache, a.slots[i])
        out = q
        if "paged_decode" in use:
            out = ops.paged_attention_decode(q, a.key_cache, a.value_cache, a.tables, a.lens[i], d**-0.5)
        if "sigmoid_gate_mul" in use:
            out = ops.sigmoid_gate_mul(out, gate)
        out = out.flatten(1)
        if "linear_o" in use:
            out = ops.linear_small(out, a.w_o, None)
        state["x"] = out
        return out

    return link, [a.key_cache, a.value_cache]


def bisect_attention(iters: int) -> list[str]:
    report = []
    for context in (2000, 200):
        for n in range(len(ATTN_KERNELS) + 1):
            for subset in itertools.combinations(ATTN_KERNELS, n):
                torch.manual_seed(n)
                link, buffers = attention_link(frozenset(subset), context, iters)
                bad = mismatches(link, buffers, iters)
                if bad:
                    names = " -> ".join(("linear_qkv",) + subset)
                    report.append(f"context={context} {names}: {'; '.join(bad)}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=32)
    args = parser.parse_args()
    assert ops.extension_available() and torch.cuda.is_available(), "needs the CUDA extension and a GPU"
    report = bisect_attention(args.iters) + bisect_dense(args.iters)
    print(f"{len(report)} sequences differ with PDL on:" if report else "no sequence differs with PDL on")
    for line in report:
        print("  " + line)


if __name__ == "__main__":
    main()
