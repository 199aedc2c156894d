"""Tensor-parallel linear layers (column, row, merged column, QKV, replicated).

Every parameter carries two attributes the checkpoint loader uses:

- `param.shard_spec(shard_id=None) -> ShardSpec`: the shape of the checkpoint
  tensor this parameter (part) comes from and which slice of it this rank
  needs, so the loader can read just that slice (`CheckpointReader.read`);
- `param.weight_loader(param, loaded, shard_id=None)`: copies `loaded` (either
  the full checkpoint tensor or exactly the slice the spec names) into place.

`shard_id` picks the part of a fused parameter: `0, 1, ...` for
`MergedColumnParallelLinear` (gate, up), or a tuple of its consecutive parts
held by one checkpoint tensor (Gated DeltaNet's `in_proj_qkv` is parts
`(0, 1, 2)` of `in_proj`); `"q" | "k" | "v"` for `QKVParallelLinear`; `None`
means the checkpoint tensor is already fused (e.g. the ViT's `qkv.weight`). Weight loaders raise `ValueError` on a shape
mismatch; the loader turns that into a `CheckpointError` naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ops
from models.layers.parallel import SINGLE, ParallelContext, all_gather, all_reduce, divide

ShardId = int | str | tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Slice `[start, start + length)` along `dim` of a checkpoint tensor of `full_shape`.

    `dim=None` means the whole tensor is needed.
    """

    full_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    length: int | None = None

    @property
    def slice_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = self.length
        return tuple(shape)

    def take(self, loaded: torch.Tensor) -> torch.Tensor:
        """Narrow a full checkpoint tensor to the slice; pass an already-sliced one through."""
        shape = tuple(loaded.shape)
        if shape == self.slice_shape:
            return loaded
        if shape == self.full_shape and self.dim is not None:
            return loaded.narrow(self.dim, self.start, self.length)
        raise ValueError(
            f"tensor of shape {list(shape)} does not match the expected checkpoint shape "
            f"{list(self.full_shape)} (or its slice {list(self.slice_shape)})"
        )


# Up to this many rows (decode batches), a 16-bit CUDA linear whose output is no wider than
# its input runs as one weight-streaming kernel (ops.linear_small) instead of cuBLAS. On the
# H200 (BENCHMARKS.md section 9) the stream wins where cuBLAS splits K and adds a reduce kernel
# (N <= K: 0.8B o_proj 5.0 vs 12.6 us, down 6.0 vs 8.0, 30B-A3B o_proj 8.5 vs 9.6, router 3.4
# vs 4.7) and loses where N > K (0.8B qkv 5.9 vs 5.4, in_proj 7.7 vs 6.8, 30B-A3B qkv 8.9 vs 7.8).
SMALL_ROWS = 16
_STREAMED_DTYPES = (torch.bfloat16, torch.float16)
_KERNELS = ops.extension_available()


def streams_small_rows(x: torch.Tensor) -> bool:
    """Whether `ops.linear_small` / `ops.gate_up_silu_small` take `x [M, K]` (M <= SMALL_ROWS).

    Plain attribute tests only: this runs for every linear of every decode step, and the
    batch-64 step is host-bound.
    """
    return x.dim() == 2 and x.shape[0] <= SMALL_ROWS and x.dtype in _STREAMED_DTYPES and x.is_cuda and _KERNELS


def _streams_wide() -> bool:
    """Whether linears wider than their input (qkv, Gated DeltaNet's in_proj, a large MLP's
    gate_up) stream small rows too: only with `SPLITVL_STREAM_WIDE=1` (read once, at import).

    Alone, cuBLAS wins there (the comment above); in a CUDA-graphed decode step with PDL the
    stream overlaps its neighbours' tails where cuBLAS' kernel cannot (`bench.moe --stream-wide
    on,off`, BENCHMARKS.md 18).
    """
    return os.environ.get("SPLITVL_STREAM_WIDE", "") == "1"


STREAMS_WIDE = _streams_wide()


def set_streamed_small_rows(model: nn.Module, wide: bool) -> None:
    """Which linears of `model` stream small-row inputs (`ops.linear_small`): all of them
    (`wide`), or only those whose output is no wider than their input (what a build picks unless
    `SPLITVL_STREAM_WIDE=1`). Benchmarks time
    both (`bench.moe --stream-wide on,off`): inside a CUDA graph with PDL a streamed qkv may
    overlap its neighbours where cuBLAS' kernel cannot."""
    for module in model.modules():
        if isinstance(module, LinearBase):
            narrow = module.output_size_per_partition <= module.input_size_per_partition
            module.streams_small = wide or narrow


def _input_norm_folded_on_cuda() -> bool:
    """Whether CUDA steps fold a layer's input norm into its first projection at decode
    (`ColumnParallelLinear.norm_forward`): only with `SPLITVL_NORM_QKV_FUSED=1`.

    Read once, at import. The fused kernel's CUDA source compiles in CI but has not yet passed
    its GPU tests, so CUDA keeps norm-then-linear unless asked; CPU always folds, so the CPU
    parity tests against transformers run the plumbing.
    """
    return os.environ.get("SPLITVL_NORM_QKV_FUSED", "") == "1"


NORM_FOLDED_ON_CUDA = _input_norm_folded_on_cuda()
# Rows up to which norm_forward folds the norm into the linear. Every CTA of the fused kernel
# reads all rows of x and the residual for the norm (T x H x 4 bytes from L2 each), which is
# nothing at batch 1 and grows with T: bench/ops.py's add_rms_norm_linear_small rows at
# T = 1, 4, 16 say where it stops paying on the GPU.
NORM_FOLD_ROWS = SMALL_ROWS


def set_input_norm_folded(model: nn.Module, enabled: bool | None) -> None:
    """Set `folds_norm` on every column-parallel linear of `model` (None: each device's default).
    Benchmarks time both (`bench.moe --norm-qkv on,off`)."""
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear):
            module.folds_norm = enabled

def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"tensor of shape {list(src.shape)} does not fit parameter part {list(dst.shape)}")
    dst.copy_(src)


class LinearBase(nn.Module):
    """Holds the weight `[out_per_rank, in_per_rank]` and optional bias `[out_per_rank]`.

    `disable_tp=True` makes the layer behave as if tp_size were 1 (replicated
    weights, no collectives), as the vision tower uses it.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        parallel: ParallelContext | None,
        disable_tp: bool,
        tp_dim: int | None,
    ) -> None:
        super().__init__()
        self.parallel = SINGLE if (parallel is None or disable_tp) else parallel
        self.tp_rank = self.parallel.tp_rank
        self.tp_size = self.parallel.tp_size
        self.tp_dim = tp_dim
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = input_size // self.tp_size if tp_dim == 1 else input_size
        self.output_size_per_partition = output_size // self.tp_size if tp_dim == 0 else output_size
        self.streams_small = STREAMS_WIDE or self.output_size_per_partition <= self.input_size_per_partition
        if tp_dim == 0:
            divide(output_size, self.tp_size)
        elif tp_dim == 1:
            divide(input_size, self.tp_size)
        self.weight = nn.Parameter(
            torch.empty(self.output_size_per_partition, self.input_size_per_partition),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader
        self.weight.shard_spec = lambda shard_id=None: self.shard_spec(self.weight, shard_id)
        if bias:
            bias_size = self.output_size_per_partition
            self.bias = nn.Parameter(torch.empty(bias_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
            self.bias.shard_spec = lambda shard_id=None: self.shard_spec(self.bias, shard_id)
        else:
            self.register_parameter("bias", None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ weight^T (+ bias)` on this rank. Shapes: x [..., in_per_rank] -> [..., out_per_rank]."""
        if self.streams_small and streams_small_rows(x):
            return ops.linear_small(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def shard_spec(self, param: nn.Parameter, shard_id: ShardId = None) -> ShardSpec:
        """Which slice of the checkpoint tensor for `param` this rank needs."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")
        full = self._full_shape(param)
        dim = self.tp_dim if (self.tp_dim is not None and self.tp_dim < param.dim()) else None
        if dim is None or self.tp_size == 1:
            return ShardSpec(full)
        length = param.shape[dim]
        return ShardSpec(full, dim, self.tp_rank * length, length)

    def _full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        if param.dim() == 2:
            return (self.output_size, self.input_size)
        # A bias is sharded with the output (column) and replicated for row layers.
        return (self.output_size,)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
    ) -> None:
        _copy_into(param.data, self.shard_spec(param, shard_id).take(loaded))


class ReplicatedLinear(LinearBase):
    """Full weight on every rank. Shapes: x [..., in] -> [..., out]."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False,
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__(input_size, output_size, bias, parallel, disable_tp=True, tp_dim=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks. Shapes: x [..., in] -> [..., out / tp] (or [..., out] gathered)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False,
        parallel: ParallelContext | None = None, disable_tp: bool = False,
        gather_output: bool = False,
    ) -> None:
        super().__init__(input_size, output_size, bias, parallel, disable_tp, tp_dim=0)
        self.gather_output = gather_output
        self.folds_norm: bool | None = None  # norm_forward's fused path; None: the device's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias)
        return all_gather(y, self.parallel, dim=-1) if self.gather_output else y

    def norm_forward(
        self, x: Any, residual: torch.Tensor, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`self(y)` and the new residual, where `y, residual = norm(x, residual)`: a pre-norm
        block's input norm (an RMSNorm: `weight`, `eps`) and first projection. `x` is a tensor or
        the previous MoE block's pending combine (`models.layers.moe.PendingCombine`; typed loosely
        here: that module imports this one).

        At decode rows on this rank's full input (the layer is column-parallel) they are one
        `ops.add_rms_norm_linear_small`, which leaves x and residual as they were and returns
        the new residual; otherwise `norm` runs in place, then this linear.
        Shapes: x [T, in], residual [T, in] -> ([T, out / tp], [T, in]).
        """
        if self._folds_norm(x):
            return ops.add_rms_norm_linear_small(x, residual, norm.weight, norm.eps, self.weight, self.bias)
        x, residual = norm(x, residual)
        return self(x), residual

    def _folds_norm(self, x: Any) -> bool:
        """Decode rows of a tensor (a MoE block's pending combine takes its own fused norm); on
        CUDA also `SPLITVL_NORM_QKV_FUSED` (or `folds_norm`) and bf16/fp16."""
        if not isinstance(x, torch.Tensor) or self.gather_output or x.dim() != 2 or x.shape[0] > NORM_FOLD_ROWS:
            return False
        if x.is_cuda:
            enabled = NORM_FOLDED_ON_CUDA if self.folds_norm is None else self.folds_norm
            return enabled and streams_small_rows(x)
        return self.folds_norm is not False


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused in one matmul (gate/up -> gate_up_proj).

    Each rank holds `[out_0 / tp, out_1 / tp, ...]` concatenated; `shard_id` is the
    index of the part. Shapes: x [..., in] -> [..., sum(out) / tp].
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False,
        parallel: ParallelContext | None = None, disable_tp: bool = False,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, parallel, disable_tp)
        for size in self.output_sizes:
            divide(size, self.tp_size)

    def _part(self, shard_id: int) -> tuple[int, int]:
        """(offset, length) of part `shard_id` in this rank's output rows."""
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")
        sizes = [s // self.tp_size for s in self.output_sizes]
        return sum(sizes[:shard_id]), sizes[shard_id]

    def _parts(self, shard_id: tuple[int, ...] | None) -> tuple[int, ...]:
        """The parts a checkpoint tensor holds: all of them (None) or the given consecutive ones."""
        if shard_id is None:
            return tuple(range(len(self.output_sizes)))
        if not shard_id or list(shard_id) != list(range(shard_id[0], shard_id[0] + len(shard_id))):
            raise ValueError(f"{type(self).__name__}: shard {shard_id!r} is not a run of consecutive parts")
        for i in shard_id:
            self._part(i)
        return shard_id

    def shard_spec(self, param: nn.Parameter, shard_id: ShardId = None) -> ShardSpec:
        if shard_id is None or isinstance(shard_id, tuple):
            # A checkpoint tensor holding several parts: read it whole (each part gives this
            # rank its own slice), split in weight_loader.
            rows = sum(self.output_sizes[i] for i in self._parts(shard_id))
            return ShardSpec((rows, *param.shape[1:]))
        _, length = self._part(shard_id)
        full = (self.output_sizes[shard_id], *param.shape[1:])
        return ShardSpec(full, 0, self.tp_rank * length, length)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is None or isinstance(shard_id, tuple):
            parts = self._parts(shard_id)
            self.shard_spec(param, shard_id).take(loaded)
            for i, part in zip(parts, loaded.split([self.output_sizes[i] for i in parts], dim=0)):
                self.weight_loader(param, part, i)
            return
        offset, length = self._part(shard_id)
        _copy_into(param.data.narrow(0, offset, length), self.shard_spec(param, shard_id).take(loaded))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; heads split over ranks.

    When `tp_size > num_kv_heads`, each rank holds one kv head, replicated over
    `tp_size // num_kv_heads` ranks. Per rank, the output is
    `[q (num_heads * D), k (num_kv_heads * D), v (num_kv_heads * D)]` with the
    per-rank head counts in `self.num_heads` / `self.num_kv_heads`.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
        bias: bool = False, parallel: ParallelContext | None = None, disable_tp: bool = False,
    ) -> None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        tp = 1 if (parallel is None or disable_tp) else parallel.tp_size
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = divide(num_heads, tp)
        if tp >= num_kv_heads:
            divide(tp, num_kv_heads)
            self.num_kv_heads = 1
        else:
            self.num_kv_heads = divide(num_kv_heads, tp)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # output_size is the *per-rank* size times tp, so LinearBase allocates q+2kv rows per rank.
        super().__init__(hidden_size, (self.q_size + 2 * self.kv_size) * tp, bias, parallel, disable_tp)

    def _full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        rows = (self.total_num_heads + 2 * self.total_num_kv_heads) * self.head_dim
        return (rows, *param.shape[1:])

    def _part(self, shard_id: str) -> tuple[int, int, int, int]:
        """(offset in rank rows, length, start in checkpoint part, checkpoint part rows)."""
        d = self.head_dim
        if shard_id == "q":
            return 0, self.q_size, self.tp_rank * self.q_size, self.total_num_heads * d
        if shard_id in ("k", "v"):
            replicas = max(1, self.tp_size // self.total_num_kv_heads)
            start = (self.tp_rank // replicas) * self.kv_size
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            return offset, self.kv_size, start, self.total_num_kv_heads * d
        raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")

    def shard_spec(self, param: nn.Parameter, shard_id: ShardId = None) -> ShardSpec:
        if shard_id is None:
            return ShardSpec(self._full_shape(param))
        _, length, start, rows = self._part(shard_id)
        return ShardSpec((rows, *param.shape[1:]), 0, start, length)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
    ) -> None:
        if shard_id is None:
            ShardSpec(self._full_shape(param)).take(loaded)
            d = self.head_dim
            sizes = [self.total_num_heads * d, self.total_num_kv_heads * d, self.total_num_kv_heads * d]
            for sid, part in zip("qkv", loaded.split(sizes, dim=0)):
                self.weight_loader(param, part, sid)
            return
        offset, length, _, _ = self._part(shard_id)
        _copy_into(param.data.narrow(0, offset, length), self.shard_spec(param, shard_id).take(loaded))


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial products all-reduced in forward.

    Shapes: x [..., in / tp] -> [..., out]. The bias (replicated) is added once,
    after the reduction.
    """

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False,
        parallel: ParallelContext | None = None, disable_tp: bool = False,
        reduce_results: bool = True,
    ) -> None:
        super().__init__(input_size, output_size, bias, parallel, disable_tp, tp_dim=1)
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        if self.reduce_results:
            y = all_reduce(y, self.parallel)
        return y + self.bias if self.bias is not None else y
