"""One-shot all-reduce of small rows over CUDA IPC (TP decode), NCCL for the rest.

At TP decode a step's all-reduces carry a few KB each (batch x hidden, bf16)
and NCCL's per-call latency dominates them. Here every rank registers one
device buffer once (`ops.custom_ar_*`), the ranks exchange the
IPC handles over the TP group, and `custom_all_reduce` is then one kernel per
call: each rank copies its rows into its own buffer, meets the others at a
flag barrier in those buffers, and sums every rank's copy over NVLink in rank
order (so every rank gets the same bits; with two ranks they equal NCCL's).
The kernel keeps its call counter on the device, so it can be captured in a
CUDA graph and replayed. Layout and memory-ordering argument:
`ops/csrc/cuda/custom_allreduce.cu`.

Used by `models.layers.parallel.all_reduce` when the `ParallelContext` carries
one (`EngineConfig.custom_all_reduce`); rows that do not fit (`fits_one_shot`)
go through torch.distributed. Every rank takes the same decision per call, as
the ranks reduce the same shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import ops
from ops.reference_comm import HANDLE_BYTES

log = logging.getLogger(__name__)

MAX_RANKS = 8
DEFAULT_MAX_BYTES = 512 * 1024
SIGNAL_BYTES = 4096  # the flag area before the data slots (kDataOffset in the .cu)
ONE_SHOT_DTYPES = (torch.bfloat16, torch.float16)


def fits_one_shot(nbytes: int, dtype: torch.dtype, contiguous: bool, address: int, max_bytes: int) -> bool:
    """Whether a tensor of `nbytes` at `address` can take the one-shot kernel (else NCCL)."""
    return (dtype in ONE_SHOT_DTYPES and contiguous and 0 < nbytes <= max_bytes
            and nbytes % 16 == 0 and address % 16 == 0)


def peer_device_indices(local_uuids: list[str], rank_uuids: list[str]) -> list[int] | None:
    """This process's device index of every rank's GPU (by UUID), or None when one is not
    visible here (CUDA IPC maps a peer's memory only when its GPU is visible)."""
    index = {uuid: i for i, uuid in enumerate(local_uuids)}
    if len(set(rank_uuids)) != len(rank_uuids):
        return None  # two ranks on one GPU: nothing to gain, and the kernel assumes distinct buffers
    found = [index.get(uuid) for uuid in rank_uuids]
    return None if any(i is None for i in found) else found


def unusable_reason(device: torch.device, world: int, rank_uuids: list[str], local_uuids: list[str],
                    can_access: Callable[[int, int], bool], extension: bool = True) -> str | None:
    """Why this rank cannot use the one-shot path (None: it can). `can_access(a, b)` is
    `torch.cuda.can_device_access_peer` and `extension` whether the splitvl kernels are
    loaded, passed in so the decision is testable without GPUs."""
    if not extension:
        return "the splitvl extension is not loaded (reference ops)"
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if not 2 <= world <= MAX_RANKS:
        return f"world size {world} not in [2, {MAX_RANKS}]"
    indices = peer_device_indices(local_uuids, rank_uuids)
    if indices is None:
        return "not every rank's GPU is visible here, or two ranks share a GPU"
    own = device.index if device.index is not None else torch.cuda.current_device()
    for peer in indices:
        if peer != own and not can_access(own, peer):
            return f"no P2P access from GPU {own} to GPU {peer}"
    return None


def _device_uuids() -> list[str]:
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


class CustomAllReduce:
    """This rank's registered buffer and every rank's mapping of theirs (see module doc).

    Create with `create` (collective over `group`: every rank calls it); `close` unmaps.
    """

    def __init__(self, buffer: torch.Tensor, rank_ptrs: torch.Tensor, rank: int, max_bytes: int):
        self.buffer = buffer
        self.rank_ptrs = rank_ptrs  # [world, 2] int64: address of each rank's buffer, mapping to close
        self.ptrs = [int(p) for p in rank_ptrs[:, 0].tolist()]
        self.rank = rank
        self.max_bytes = max_bytes

    @classmethod
    def create(cls, group: Any, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES) -> CustomAllReduce | None:
        """Register and exchange the buffers over `group`, or None on every rank when any rank
        cannot use them (the reason is logged); collective."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local = _device_uuids() if device.type == "cuda" else []
        own_uuid = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""
        uuids: list[Any] = [None] * world
        dist.all_gather_object(uuids, own_uuid, group=group)
        reason = unusable_reason(device, world, uuids, local, torch.cuda.can_device_access_peer,
                                 ops.extension_available())
        reasons: list[Any] = [None] * world
        dist.all_gather_object(reasons, reason, group=group)
        if any(r is not None for r in reasons):
            log.warning("custom all-reduce off, NCCL for every all-reduce: %s",
                        next(f"rank {i}: {r}" for i, r in enumerate(reasons) if r is not None))
            return None
        if max_bytes % 16 != 0 or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive multiple of 16, got {max_bytes}")
        buffer = torch.zeros(SIGNAL_BYTES + 2 * max_bytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)  # the flags are zero before any peer can see the buffer
        handle = ops.custom_ar_export(buffer)
        handles: list[Any] = [None] * world
        dist.all_gather_object(handles, handle.numpy().tobytes(), group=group)
        table = torch.frombuffer(bytearray(b"".join(handles)), dtype=torch.uint8).view(world, HANDLE_BYTES)
        rank_ptrs = ops.custom_ar_open(table, buffer, rank)
        return cls(buffer, rank_ptrs, rank, max_bytes)

    def fits(self, x: torch.Tensor) -> bool:
        return fits_one_shot(x.numel() * x.element_size(), x.dtype, x.is_contiguous(), x.data_ptr(),
                             self.max_bytes)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks in place (the caller checked `fits`). Shapes: x [...] -> x."""
        ops.custom_all_reduce(x, self.buffer, self.ptrs, self.rank)
        return x

    def close(self) -> None:
        """Unmap the peers' buffers (after the device finished every call using them)."""
        if self.ptrs:
            torch.cuda.synchronize(self.buffer.device)
            ops.custom_ar_close(self.rank_ptrs, self.buffer)
            self.ptrs = []
