"""Sparse MoE block: router, top-k softmax, experts run only on their tokens.

The router's top-k and the expert alignment run as `ops.moe_route` (one launch
at decode), the experts as `ops.moe_gate_up` -> `ops.moe_down` ->
`ops.moe_combine`: every size comes from the token count, never from the
routing, so the block does not sync with the host (CUDA-graph capturable).
Large eager bf16 steps on Hopper (`GROUPED_GEMM_MIN_TOKENS`) sort the pairs without
padding instead (`ops.moe_permute`) and run the two expert GEMMs as
`torch._grouped_mm` over the experts' row offsets, still without a host sync.

Decode steps (up to `FUSED_DECODE_MAX_TOKENS` tokens) of a block without a shared
expert at TP=1 fuse both ends: `ops.moe_gate_route` runs the router linear with
the routing in one launch, and the block hands back its weighted expert rows
uncombined (`PendingCombine`); the next layer's input norm, or the final norm,
sums them into the residual inside its add + norm (`ops.moe_combine_add_rms_norm`).
Anything else that reads the block output `materialize`s it first.

Decode steps of up to `ops.MOE_DECODE_BLOCK_MAX_TOKENS` tokens of such a block can instead run
the whole second half of the layer as one op (`forward_block`: `ops.moe_decode_block`, the
layer's `post_attention_layernorm` add + norm, router, routing, experts and combine; on CUDA
one launch), when `block_kernel` says so (on CUDA unless `SPLITVL_MOE_BLOCK_KERNEL=0`).

Expert weights are 3-D stacked parameters, TP-sharded on the intermediate dim:
`experts.gate_up_proj [E, 2 * I / tp, H]` (this rank's gate rows, then its up
rows) and `experts.down_proj [E, H, I / tp]`. The block's partial sums are
all-reduced once at its end.

Checkpoint layouts read by `FusedExperts.load_checkpoint`:
- fused, as transformers 5 keeps them in memory and `save_pretrained` writes
  them: `experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`;
- fused, transposed, as the published Qwen3-VL-MoE checkpoints store them:
  `[E, H, 2I]`, `[E, I, H]` (told apart by shape, as transformers does);
- per expert: `experts.{e}.{gate,up,down}_proj.weight` (Qwen3-MoE, Qwen3.5-MoE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

import ops
from models.layers.linear import ReplicatedLinear
from models.layers.mlp import SwiGLUMLP
from models.layers.parallel import SINGLE, ParallelContext, all_reduce, divide
from models.loader import CheckpointError, CheckpointReader


# Tokens from which an eager CUDA step runs the experts as torch._grouped_mm (CUTLASS's sm90
# grouped GEMM) instead of moe_gemm.cu's kernels. H200, 30B-A3B experts (E=128, H=2048, I=768,
# top-8), gate_up + down: T=512 422 us vs 486, T=1,024 408 vs 648, T=4,096 690 vs 1,634. Smaller
# steps (under 32 rows per expert) were not measured against it and keep the kernels.
GROUPED_GEMM_MIN_TOKENS = 512
# torch runs its CUTLASS kernel for bf16 on sm90/sm100 only; elsewhere (fp16 too) it falls back
# to a loop over the groups that reads the offsets on the host (a sync every layer).
_GROUPED_GEMM_ARCHS = (9, 10)
# Tokens up to which a step takes the fused decode path: the CUDA router keeps one fp32
# accumulator per token in registers (ops/csrc/cuda/moe_gate_route.cu).
FUSED_DECODE_MAX_TOKENS = 16


def _fused_decode_on_cuda() -> bool:
    """Whether CUDA steps take the fused decode path: only with `SPLITVL_MOE_FUSED_DECODE=1`.

    Read once, at import. The fused kernels' CUDA sources compile in CI but have not yet
    passed their GPU tests, so CUDA keeps the unfused path unless asked; CPU always fuses,
    so the CPU parity tests against transformers run the fused plumbing.
    """
    return os.environ.get("SPLITVL_MOE_FUSED_DECODE", "") == "1"


FUSED_DECODE_ON_CUDA = _fused_decode_on_cuda()


# Whether CUDA steps take the one-op block path (`forward_block`): yes unless
# `SPLITVL_MOE_BLOCK_KERNEL=0`, read once, at import; CPU always takes it. On by default since its
# GPU tests passed and the full 30B-A3B graph step at batch 1 measured 3.71 vs 3.83 ms (one H100,
# BENCHMARKS.md 17). Its grid barrier needs the whole persistent grid resident at once: a
# process sharing the GPU's SMs with another's kernels through MPS should set it to 0.
BLOCK_KERNEL_ON_CUDA = os.environ.get("SPLITVL_MOE_BLOCK_KERNEL", "1") != "0"


def block_kernel_default(device: torch.device) -> bool:
    """Whether a MoE block on `device` takes the one-op block path unless told (`block_kernel`)."""
    return device.type != "cuda" or BLOCK_KERNEL_ON_CUDA


def fused_decode_default(device: torch.device) -> bool:
    """Whether a MoE block on `device` takes the fused decode path unless told (`fused_decode`)."""
    return device.type != "cuda" or FUSED_DECODE_ON_CUDA


@dataclass(frozen=True, slots=True)
class PendingCombine:
    """A MoE block's output before its combine: each routed pair's weighted expert row.

    Shapes: rows [capacity, H] (`ops.moe_down`'s, router weights applied); alignment of the
    [T, k] pairs.
    """

    rows: torch.Tensor
    alignment: ops.MoeAlignment


def materialize(x: torch.Tensor | PendingCombine) -> torch.Tensor:
    """The block output as a tensor: a pending combine summed (`ops.moe_combine`).

    Shapes: x [T, H] or pending rows of T tokens -> [T, H].
    """
    if isinstance(x, PendingCombine):
        return ops.moe_combine(x.rows, x.alignment, None)
    return x


class FusedExperts(nn.Module):
    """`num_experts` SwiGLU experts; only the (token, expert) pairs routed are computed."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int,
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel or SINGLE
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.shard = divide(intermediate_size, self.parallel.tp_size)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.shard, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.shard), requires_grad=False)

    def uses_grouped_gemm(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens runs the experts as `torch._grouped_mm`.

        Only eager CUDA steps (a graph capture keeps the kernels every decode replay uses) in
        bf16 on sm90/sm100, from `GROUPED_GEMM_MIN_TOKENS`, with 16-byte rows (H and I/tp
        multiples of 8).
        """
        weight = self.gate_up_proj
        return (
            tokens >= GROUPED_GEMM_MIN_TOKENS
            and weight.is_cuda
            and weight.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(weight.device)[0] in _GROUPED_GEMM_ARCHS
            and self.hidden_size % 8 == 0
            and self.shard % 8 == 0
            and not torch.cuda.is_current_stream_capturing()
        )

    def route(
        self, router_logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[torch.Tensor, ops.MoeAlignment | ops.MoePermutation]:
        """The router's top-k weights and the routed pairs in the order `forward` runs them.

        Shapes: router_logits [T, E] -> (topk_weights fp32 [T, k], alignment or permutation).
        """
        if self.uses_grouped_gemm(router_logits.shape[0]):
            weights, ids = ops.topk_softmax(router_logits, top_k, renormalize)
            return weights, ops.moe_permute(ids, self.num_experts)
        weights, _, alignment = ops.moe_route(router_logits, top_k, renormalize)
        return weights, alignment

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, routing: ops.MoeAlignment | ops.MoePermutation
    ) -> torch.Tensor:
        """Partial (this rank's) expert output, not yet reduced.

        Shapes: x [T, H]; topk_weights fp32 [T, k]; routing of the [T, k] routed pairs -> [T, H].
        """
        if isinstance(routing, ops.MoePermutation):
            return grouped_experts(x, self.gate_up_proj, self.down_proj, topk_weights, routing)
        return ops.moe_combine(self.weighted_rows(x, topk_weights, routing), routing)

    def weighted_rows(self, x: torch.Tensor, topk_weights: torch.Tensor, alignment: ops.MoeAlignment) -> torch.Tensor:
        """Each routed pair's expert output times its router weight, before the combine.

        Shapes: x [T, H]; topk_weights fp32 [T, k] -> [alignment.capacity, H].
        """
        h = ops.moe_gate_up(x, self.gate_up_proj, alignment)
        return ops.moe_down(h, self.down_proj, topk_weights, alignment)

    def load_checkpoint(self, reader: CheckpointReader, prefix: str) -> list[str]:
        """Fill both stacked params from `prefix` (e.g. `...layers.0.mlp.experts.`).

        Returns the checkpoint keys read.
        """
        if reader.has(prefix + "gate_up_proj"):
            return self._load_fused(reader, prefix)
        if reader.has(prefix + "0.gate_proj.weight"):
            return self._load_per_expert(reader, prefix)
        raise CheckpointError(
            f"missing tensor {prefix}gate_up_proj (nor per-expert {prefix}0.gate_proj.weight found)"
        )

    def _orientation(self, reader: CheckpointReader, key: str, rows: int, cols: int) -> bool:
        """True if `key` is stored [E, rows, cols] (as in memory), False if [E, cols, rows]."""
        shape = tuple(reader.shape(key))
        if shape == (self.num_experts, rows, cols):
            return True
        if shape == (self.num_experts, cols, rows):
            return False
        raise CheckpointError(
            f"tensor {key} has shape {list(shape)}, expected {[self.num_experts, rows, cols]} "
            f"or its transpose {[self.num_experts, cols, rows]}"
        )

    def _load_fused(self, reader: CheckpointReader, prefix: str) -> list[str]:
        n, rank, size = self.shard, self.parallel.tp_rank, self.intermediate_size
        gate_up, down = prefix + "gate_up_proj", prefix + "down_proj"
        as_memory = self._orientation(reader, gate_up, 2 * size, self.hidden_size)
        for part, start in enumerate((rank * n, size + rank * n)):
            if as_memory:
                rows = reader.read(gate_up, 1, start, n)
            else:
                rows = reader.read(gate_up, 2, start, n).transpose(1, 2)
            self.gate_up_proj.data[:, part * n : (part + 1) * n].copy_(rows)
        if self._orientation(reader, down, self.hidden_size, size):
            self.down_proj.data.copy_(reader.read(down, 2, rank * n, n))
        else:
            self.down_proj.data.copy_(reader.read(down, 1, rank * n, n).transpose(1, 2))
        return [gate_up, down]

    def _load_per_expert(self, reader: CheckpointReader, prefix: str) -> list[str]:
        n, rank = self.shard, self.parallel.tp_rank
        keys = []
        for e in range(self.num_experts):
            for part, name in enumerate(("gate_proj", "up_proj")):
                key = f"{prefix}{e}.{name}.weight"
                _check_shape(reader, key, (self.intermediate_size, self.hidden_size))
                self.gate_up_proj.data[e, part * n : (part + 1) * n].copy_(reader.read(key, 0, rank * n, n))
                keys.append(key)
            key = f"{prefix}{e}.down_proj.weight"
            _check_shape(reader, key, (self.hidden_size, self.intermediate_size))
            self.down_proj.data[e].copy_(reader.read(key, 1, rank * n, n))
            keys.append(key)
        return keys


def grouped_experts(
    x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, topk_weights: torch.Tensor,
    permutation: ops.MoePermutation,
) -> torch.Tensor:
    """SwiGLU experts as gather -> grouped GEMM -> SiLU-and-mul -> grouped GEMM -> weighted combine.

    The weights are read in place, column-major through `transpose` views (what the grouped
    GEMM takes for B); the router weights apply once, in the fp32 combine. Rows past the last
    offset (dropped pairs) hold whatever the GEMMs leave there, and the combine never reads them.
    Shapes: x [T, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; topk_weights fp32 [T, k] -> [T, H].
    """
    offsets = permutation.expert_offsets
    rows = x.index_select(0, permutation.row_tokens)
    gate_up = torch._grouped_mm(rows, gate_up_proj.transpose(1, 2), offs=offsets)
    y = torch._grouped_mm(ops.silu_and_mul(gate_up), down_proj.transpose(1, 2), offs=offsets)
    return ops.moe_combine(y, permutation, topk_weights)


def _check_shape(reader: CheckpointReader, key: str, expected: tuple[int, ...]) -> None:
    shape = tuple(reader.shape(key))
    if shape != expected:
        raise CheckpointError(f"tensor {key} has shape {list(shape)}, expected {list(expected)}")


class SparseMoeBlock(nn.Module):
    """Router linear -> top-k and the pairs' order (`FusedExperts.route`) -> selected experts
    (+ gated shared expert).

    Param names follow the checkpoints: `gate.weight [E, H]` (router),
    `experts.*`, and with `shared_expert_intermediate_size > 0`
    `shared_expert.*` plus `shared_expert_gate.weight [1, H]` (sigmoid gate).
    `fused_decode` picks the decode path: None (the device's default: CPU fused, CUDA
    as `SPLITVL_MOE_FUSED_DECODE` says), True or False (tests and benchmarks compare them).
    `block_kernel` likewise picks the one-op path of the decoder layer (`takes_block`:
    CPU on, CUDA unless `SPLITVL_MOE_BLOCK_KERNEL=0`), ahead of the fused decode path.
    Shapes: x [T, H] -> [T, H].
    """

    # Whether `forward` runs without host syncs, so a CUDA graph may capture it (the model's
    # `supports_cuda_graphs` asks): every size in the expert ops comes from the token count.
    capturable = True

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        parallel: ParallelContext | None = None,
        shared_expert_intermediate_size: int = 0,
    ) -> None:
        super().__init__()
        self.parallel = parallel or SINGLE
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, self.parallel)
        if shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLUMLP(
                hidden_size, shared_expert_intermediate_size, self.parallel, reduce_results=False
            )
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None
        self.fused_decode: bool | None = None
        # moe_gate_route's arrival counter: persistent, so no step launches a memset for it.
        self.register_buffer("route_arrivals", torch.zeros(1, dtype=torch.int32), persistent=False)
        self.block_kernel: bool | None = None
        # moe_decode_block's grid-barrier counter: persistent likewise.
        self.register_buffer("block_barrier", torch.zeros(1, dtype=torch.int32), persistent=False)

    def takes_block(self, x: torch.Tensor) -> bool:
        """Whether the decoder layer hands this block its un-normalised input (`forward_block`)."""
        enabled = self.block_kernel if self.block_kernel is not None else block_kernel_default(x.device)
        return (
            enabled and self.shared_expert is None and self.parallel.tp_size == 1
            and 0 < x.shape[0] <= ops.MOE_DECODE_BLOCK_MAX_TOKENS
        )

    def forward_block(
        self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`norm(x, residual)` (the layer's post-attention add + RMSNorm, its `weight` and `eps`)
        then this block, as one op (`ops.moe_decode_block`); residual is updated in place.

        Shapes: x [T, H] (the token mixer's output), residual [T, H] -> (block output, residual).
        """
        return ops.moe_decode_block(
            x, residual, norm.weight, norm.eps, self.gate.weight, self.experts.gate_up_proj,
            self.experts.down_proj, self.top_k, self.norm_topk_prob, self.block_barrier,
        )

    def defers_combine(self, x: torch.Tensor) -> bool:
        """Whether `forward_deferred(x)` takes the fused decode path (and leaves the combine pending)."""
        fused = self.fused_decode if self.fused_decode is not None else fused_decode_default(x.device)
        return (
            fused and self.shared_expert is None and self.parallel.tp_size == 1
            and 0 < x.shape[0] <= FUSED_DECODE_MAX_TOKENS
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return materialize(self.forward_deferred(x))

    def forward_deferred(self, x: torch.Tensor) -> torch.Tensor | PendingCombine:
        """The block output, or at decode its expert rows with the combine left to the next norm.

        Shapes: x [T, H] -> [T, H] or PendingCombine of T tokens.
        """
        if self.defers_combine(x):
            weights, _, alignment = ops.moe_gate_route(
                x, self.gate.weight, self.top_k, self.norm_topk_prob, self.route_arrivals
            )
            return PendingCombine(self.experts.weighted_rows(x, weights, alignment), alignment)
        router_logits = self.gate(x)
        weights, routing = self.experts.route(router_logits, self.top_k, self.norm_topk_prob)
        out = self.experts(x, weights, routing)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(out, self.parallel)


def set_fused_decode(model: nn.Module, enabled: bool | None) -> None:
    """Set `fused_decode` on every MoE block of `model` (None: each device's default)."""
    _set_on_blocks(model, "fused_decode", enabled)


def set_block_kernel(model: nn.Module, enabled: bool | None) -> None:
    """Set `block_kernel` on every MoE block of `model` (None: each device's default)."""
    _set_on_blocks(model, "block_kernel", enabled)


def _set_on_blocks(model: nn.Module, attr: str, enabled: bool | None) -> None:
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            setattr(module, attr, enabled)
