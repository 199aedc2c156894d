"""How image embeddings travel from a vision replica to an LLM replica.

Two ways, chosen per request:
- **object store** (`ImageEmbedding`): CPU tensors that pickle as NumPy buffers, so the LLM
  replica maps them out of Ray's store. Works between any two replicas; costs a
  device -> host copy in the vision replica and a host -> device copy in the LLM replica.
- **CUDA IPC** (`IpcEmbedding`): the vision replica on a GPU copies a request's outputs into a
  slot of a pooled device buffer it allocated once (`EmbeddingPool`) and returns a small
  handle: the pool's CUDA IPC handle, the slot's offset, shapes, dtype, node id, device uuid,
  slot id and generation. An LLM replica on the same node opens the pool once
  (`PoolReader`), copies device -> device into its own tensors and marks the slot done.

Slot release needs no Ray call: each pool has a small host shared-memory table
(`SlotTable`, int64 [slots, 2]: generation issued, generation done) that the consumer
writes. The producer reclaims done slots when it needs room, and slots held longer than a
lease even when never marked done (an aborted request cannot leak one). Reclaiming a slot
first invalidates its generation, so a consumer that reads a reused slot (a stale handle,
e.g. from the router's embedding cache) notices and the router re-encodes. A full pool
never blocks: that image goes the object-store way.
"""

from __future__ import annotations

import mmap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch

from engine.transport import dtype_name, from_numpy, to_numpy

ALIGN = 256  # slot offsets stay aligned for every dtype and for vectorized copies
_ISSUED, _DONE = 0, 1
_INVALID = -1


@dataclass(frozen=True, slots=True)
class ImageEmbedding:
    """Vision-tower output of one image, as CPU tensors (the object-store way).

    Shapes: embeds [N_tok, H]; deepstack [L, N_tok, H] (L may be 0);
    grid_thw (t, h, w) in patches.
    """

    embeds: torch.Tensor
    deepstack: torch.Tensor
    grid_thw: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[0]

    def __reduce__(self):
        # NumPy buffers: the LLM replica maps them out of the object store (engine/transport.py).
        return _rebuild_image_embedding, (to_numpy(self.embeds), to_numpy(self.deepstack),
                                          dtype_name(self.embeds), self.grid_thw)


def _rebuild_image_embedding(embeds: Any, deepstack: Any, dtype: str, grid_thw: tuple[int, int, int]) -> ImageEmbedding:
    return ImageEmbedding(from_numpy(embeds, dtype), from_numpy(deepstack, dtype), tuple(grid_thw))


@dataclass(frozen=True, slots=True)
class PoolAddress:
    """Where a pool lives: its slot table's shared-memory name, node, GPU, and CUDA IPC share."""

    table_name: str
    node_id: str
    device_uuid: str
    share: tuple  # UntypedStorage._share_cuda_() of the pool buffer, minus the device index


@dataclass(frozen=True, slots=True)
class IpcEmbedding:
    """Handle of one image's embeddings in a pool slot (the CUDA IPC way).

    The slot holds embeds [N_tok, H] at `offset`, then deepstack [L, N_tok, H], in `dtype`.
    """

    pool: PoolAddress
    slot: int
    generation: int
    offset: int
    embeds_shape: tuple[int, int]
    deepstack_shape: tuple[int, int, int]
    dtype: str
    grid_thw: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.embeds_shape[0]


class SlotTable:
    """int64 [slots, 2] in host shared memory: per slot the generation issued and the one done."""

    def __init__(self, name: str | None, slots: int = 0):
        """`name` None creates a new table of `slots` rows; else attaches to that table."""
        self.shm: shared_memory.SharedMemory | None = None
        self._map: mmap.mmap | None = None
        if name is None:
            self.shm = shared_memory.SharedMemory(name=f"splitvl-emb-{uuid.uuid4().hex[:16]}",
                                                  create=True, size=max(slots, 1) * 16)
            self.name, buf = self.shm.name, self.shm.buf
        else:
            # Mapped as a file, not through SharedMemory: that would register the segment with
            # this process' resource tracker, which unlinks it when this process exits.
            with open(f"/dev/shm/{name}", "r+b") as f:
                self._map = mmap.mmap(f.fileno(), 0)
            self.name, buf = name, self._map
        self.rows = np.ndarray((len(buf) // 16, 2), dtype=np.int64, buffer=buf)
        if self.shm is not None:
            self.rows[:] = _INVALID

    def issued(self, slot: int) -> int:
        return int(self.rows[slot, _ISSUED])

    def mark_done(self, slot: int, generation: int) -> None:
        self.rows[slot, _DONE] = generation

    def close(self) -> None:
        self.rows = None  # the buffer export must go before the segment closes
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
        if self._map is not None:
            self._map.close()


@dataclass(slots=True)
class _Lease:
    offset: int
    nbytes: int
    generation: int
    issued_at: float


class SlotAllocator:
    """Producer-side bookkeeping of one pool: byte ranges, slot ids, generations, leases.

    Pure host code; `allocate` never blocks and returns None when nothing fits.
    """

    def __init__(self, capacity: int, table: SlotTable, lease_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.table = table
        self.lease_s = lease_s
        self.clock = clock
        self.leases: dict[int, _Lease] = {}
        self._next_generation = 1

    def allocate(self, nbytes: int) -> tuple[int, int, int] | None:
        """(slot, offset, generation) of a new slot of `nbytes`, or None when the pool is full."""
        found = self._find(nbytes)
        if found is None and self.reclaim():
            found = self._find(nbytes)
        if found is None:
            return None
        slot, offset = found
        generation = self._next_generation
        self._next_generation += 1
        self.leases[slot] = _Lease(offset, nbytes, generation, self.clock())
        self.table.rows[slot, _ISSUED] = generation
        return slot, offset, generation

    def reclaim(self) -> int:
        """Free the slots marked done and those past their lease; returns how many were freed."""
        now = self.clock()
        freed = [s for s, lease in self.leases.items()
                 if self.table.rows[s, _DONE] == lease.generation or now - lease.issued_at > self.lease_s]
        for slot in freed:
            # Invalidate before the bytes can be reused: a late reader sees the mismatch.
            self.table.rows[slot, _ISSUED] = _INVALID
            del self.leases[slot]
        return len(freed)

    def bytes_in_use(self) -> int:
        return sum(lease.nbytes for lease in self.leases.values())

    def _find(self, nbytes: int) -> tuple[int, int] | None:
        slot = next((s for s in range(len(self.table.rows)) if s not in self.leases), None)
        if slot is None:
            return None
        offset = 0  # first fit over the gaps between live ranges
        for lease in sorted(self.leases.values(), key=lambda x: x.offset):
            if lease.offset - offset >= nbytes:
                break
            offset = _aligned(lease.offset + lease.nbytes)
        if offset + nbytes > self.capacity:
            return None
        return slot, offset


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def slot_views(buffer: torch.Tensor, offset: int, embeds_shape: tuple[int, ...],
               deepstack_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Typed views of one slot of a uint8 pool buffer.

    Shapes: buffer [capacity] uint8 -> embeds `embeds_shape`, deepstack `deepstack_shape`.
    """
    size = dtype.itemsize
    n_e, n_d = int(np.prod(embeds_shape)) * size, int(np.prod(deepstack_shape)) * size
    start_d = offset + _aligned(n_e)
    embeds = buffer[offset : offset + n_e].view(dtype).view(embeds_shape)
    deepstack = buffer[start_d : start_d + n_d].view(dtype).view(deepstack_shape)
    return embeds, deepstack


def slot_bytes(embeds: torch.Tensor, deepstack: torch.Tensor) -> int:
    return _aligned(embeds.numel() * embeds.element_size()) + deepstack.numel() * deepstack.element_size()
