"""Pure-torch reference semantics of the custom all-reduce ops (`models/layers/custom_allreduce.py`).

`custom_all_reduce` is an all-reduce (sum) over the ranks of the default
torch.distributed group, which is what its CUDA kernel computes over the
buffers the ranks registered. The buffer ops map device memory between
processes through CUDA IPC and have no torch equivalent: without the
extension they raise, and `CustomAllReduce.create` does not call them
(it falls back to torch.distributed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

HANDLE_BYTES = 72  # cudaIpcMemHandle_t (64 bytes) + an int64 offset into its allocation


def _needs_extension(op: str) -> RuntimeError:
    return RuntimeError(f"{op}: maps device memory through CUDA IPC; needs the splitvl CUDA extension")


def custom_ar_export(buffer: torch.Tensor) -> torch.Tensor:
    """The IPC handle of this rank's registered buffer, for its peers' `custom_ar_open`.

    Shapes: buffer uint8 [4096 + 2 * slot bytes] CUDA (zeroed, slot bytes % 16 == 0)
    -> uint8 [72] CPU (handle of the buffer's allocation, then the buffer's int64 offset in it).
    """
    raise _needs_extension("custom_ar_export")


def custom_ar_open(handles: torch.Tensor, buffer: torch.Tensor, rank: int) -> torch.Tensor:
    """Map every other rank's buffer into this process (`rank`'s own is `buffer`).

    Shapes: handles uint8 [world, 72] CPU (every rank's `custom_ar_export`, world 2..8),
    buffer as in `custom_ar_export` -> int64 [world, 2] CPU: each rank's buffer address
    here, and the mapping `custom_ar_close` unmaps (0 for `rank`).
    """
    raise _needs_extension("custom_ar_open")


def custom_ar_close(rank_ptrs: torch.Tensor, buffer: torch.Tensor) -> None:
    """Unmap the peers' buffers mapped by `custom_ar_open` (no call may use them after).

    Shapes: rank_ptrs int64 [world, 2] CPU; buffer this rank's registered buffer.
    """
    raise _needs_extension("custom_ar_close")


def custom_all_reduce(x: torch.Tensor, buffer: torch.Tensor, rank_ptrs: Sequence[int], rank: int) -> None:
    """In place: x = the sum of every rank's x, each rank getting the same values (the kernel
    sums in rank order in fp32, one rounding to x's dtype).

    Shapes: x [...] bf16/fp16 contiguous, 16-byte aligned, a multiple of 16 bytes and at most
    the slot bytes; buffer this rank's registered buffer; rank_ptrs [world] every rank's buffer
    address here (`custom_ar_open`'s first column), rank_ptrs[rank] == buffer's.
    """
    del buffer, rank
    if dist.get_world_size() != len(rank_ptrs):
        raise ValueError(f"custom_all_reduce: {len(rank_ptrs)} ranks, the default group has {dist.get_world_size()}")
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
