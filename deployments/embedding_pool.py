"""The CUDA IPC way of `deployments/embedding_transfer.py`: the producer's pool, the consumer's reader.

`EmbeddingPool` lives in a vision replica on a GPU; `PoolReader` in an LLM replica,
which opens each pool once and keeps it; `fetch_embeddings` is the LLM replica's whole
fetch step, including the release of slots it will never read (request aborted or failed).
With the engine in its own process (`llm.engine_process`) the replica only awaits the
handles and the engine process reads them (`deployments/image_inputs.py`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from deployments.errors import EncoderUnavailableError
from deployments.embedding_transfer import (
    ImageEmbedding,
    IpcEmbedding,
    PoolAddress,
    SlotAllocator,
    SlotTable,
    slot_bytes,
    slot_views,
)

DEFAULT_SLOTS = 1024


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_index(uuid: str) -> int | None:
    """This process' index of the GPU with that uuid (CUDA_VISIBLE_DEVICES differs per actor), or None."""
    if not torch.cuda.is_available():
        return None
    return next((i for i in range(torch.cuda.device_count()) if device_uuid(i) == uuid), None)


class EmbeddingPool:
    """One device buffer, allocated once, whose slots carry embeddings to LLM replicas."""

    def __init__(self, buffer: torch.Tensor, address: PoolAddress, table: SlotTable, lease_s: float):
        """Use `on_device`; tests pass a CPU `buffer` and a `PoolAddress` without a share."""
        self.buffer = buffer
        self.address = address
        self.table = table
        self.allocator = SlotAllocator(buffer.numel(), table, lease_s)
        self._lock = threading.Lock()  # stores run on worker threads (`asyncio.to_thread`)

    @classmethod
    def on_device(cls, capacity_bytes: int, device: torch.device, node_id: str, lease_s: float,
                  slots: int = DEFAULT_SLOTS) -> EmbeddingPool:
        buffer = torch.empty(capacity_bytes, dtype=torch.uint8, device=device)
        share = buffer.untyped_storage()._share_cuda_()  # noqa: SLF001  # once: consumers cache the opened pool
        table = SlotTable(None, slots)
        index = device.index if device.index is not None else torch.cuda.current_device()
        address = PoolAddress(table.name, node_id, device_uuid(index), tuple(share[1:]))
        return cls(buffer, address, table, lease_s)

    def store(self, embeds: torch.Tensor, deepstack: torch.Tensor,
              grid_thw: tuple[int, int, int]) -> IpcEmbedding | None:
        """Copy one image's outputs into a free slot (asynchronously on the current stream).

        None when the pool is full: that image takes the object-store way. The caller
        synchronizes the stream before handing the handles out.
        Shapes: embeds [N_tok, H]; deepstack [L, N_tok, H].
        """
        with self._lock:
            got = self.allocator.allocate(slot_bytes(embeds, deepstack))
        if got is None:
            return None
        slot, offset, generation = got
        dst_e, dst_d = slot_views(self.buffer, offset, tuple(embeds.shape), tuple(deepstack.shape), embeds.dtype)
        dst_e.copy_(embeds)
        dst_d.copy_(deepstack)
        return IpcEmbedding(self.address, slot, generation, offset, tuple(embeds.shape), tuple(deepstack.shape),
                            str(embeds.dtype).removeprefix("torch."), grid_thw)

    def close(self) -> None:
        self.table.close()


def open_cuda_pool(address: PoolAddress, index: int) -> torch.Tensor:
    """The producer's pool buffer as a uint8 tensor on this process' GPU `index` (one IPC open)."""
    torch.cuda._lazy_init()  # noqa: SLF001
    storage = torch.UntypedStorage._new_shared_cuda(index, *address.share)  # noqa: SLF001
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.uint8, _internal=True)
    return torch._utils._rebuild_tensor(typed, 0, (storage.nbytes(),), (1,))  # noqa: SLF001


class PoolReader:
    """Consumer side: opens pools once, copies slots into this replica's tensors, marks them done."""

    def __init__(self, node_id: str, device: torch.device | None,
                 open_buffer: Callable[[PoolAddress], torch.Tensor] | None = None):
        """Args:
            device: where fetched embeddings go; None takes no IPC handles (a CPU replica).
            open_buffer: opens a pool's buffer (tests inject one; default: CUDA IPC on the
                GPU with the pool's uuid).
        """
        self.node_id = node_id
        self.device = device
        self._open_buffer = open_buffer or self._open_cuda
        self._tables: dict[str, SlotTable] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._stream: Any = None

    def fetch(self, item: ImageEmbedding | IpcEmbedding) -> ImageEmbedding:
        """The embeddings as this replica's own tensors; an IPC slot is copied and marked done.

        Raises EncoderUnavailableError when the handle cannot be read here (another node,
        no GPU, or its slot was reused): the router re-encodes through the object store.
        """
        if isinstance(item, ImageEmbedding):
            return item
        try:
            buffer = self._buffer(item.pool)
        except Exception as exc:
            raise EncoderUnavailableError(f"image embeddings on another device ({exc}); retry") from None
        table = self._table(item.pool.table_name)
        if table.issued(item.slot) != item.generation:
            raise EncoderUnavailableError("image embeddings were evicted from the encoder's pool; retry")
        src_e, src_d = slot_views(buffer, item.offset, item.embeds_shape, item.deepstack_shape,
                                  getattr(torch, item.dtype))
        embeds, deepstack = self._copy(src_e), self._copy(src_d)
        self._synchronize()
        if table.issued(item.slot) != item.generation:  # reclaimed while we copied (lease ran out)
            raise EncoderUnavailableError("image embeddings were evicted from the encoder's pool; retry")
        table.mark_done(item.slot, item.generation)
        return ImageEmbedding(embeds, deepstack, tuple(item.grid_thw))

    def release(self, item: Any) -> None:
        """Mark an unread IPC slot done (request aborted or failed); anything else is ignored."""
        if not isinstance(item, IpcEmbedding) or item.pool.node_id != self.node_id:
            return
        try:
            self._table(item.pool.table_name).mark_done(item.slot, item.generation)
        except FileNotFoundError:  # the producer is gone, and its pool with it
            pass

    def _buffer(self, address: PoolAddress) -> torch.Tensor:
        if self.device is None:
            raise RuntimeError("this replica takes embeddings through the object store")
        if address.node_id != self.node_id:
            raise RuntimeError("the encoder is on another node")
        buffer = self._buffers.get(address.table_name)
        if buffer is None:
            buffer = self._buffers[address.table_name] = self._open_buffer(address)
        return buffer

    def _open_cuda(self, address: PoolAddress) -> torch.Tensor:
        index = local_device_index(address.device_uuid)
        if index is None or self.device is None or self.device.type != "cuda":
            raise RuntimeError("the encoder's GPU is not visible here")
        return open_cuda_pool(address, index)

    def _table(self, name: str) -> SlotTable:
        table = self._tables.get(name)
        if table is None:
            table = self._tables[name] = SlotTable(name)
        return table

    def _copy(self, src: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return src.to(self.device, copy=True)
        if self._stream is None:
            # Its own stream: a copy on the default stream would wait for the engine's step.
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            out = src.to(self.device, copy=True)
        out.record_stream(torch.cuda.default_stream(self.device))  # the engine reads it on the default stream
        return out

    def _synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()


async def fetch_embeddings(refs: list[Awaitable[Any]], reader: PoolReader,
                           background: set[asyncio.Task]) -> list[ImageEmbedding]:
    """Await a request's embedding refs and make them this replica's tensors, in order
    (`await_embeddings`, then `read_embeddings`)."""
    return read_embeddings(await await_embeddings(refs, reader, background), reader)


async def await_embeddings(refs: list[Awaitable[Any]], reader: PoolReader,
                           background: set[asyncio.Task]) -> list[ImageEmbedding | IpcEmbedding]:
    """Await a request's embedding refs: what the encoder returned, in order, nothing opened.

    If the wait fails or is cancelled (request aborted mid-transfer), the refs are
    awaited in a background task (kept in `background`) and their slots released
    without a copy.
    """
    try:
        return list(await asyncio.gather(*refs))
    except BaseException:
        task = asyncio.get_running_loop().create_task(_release_when_ready(refs, reader))
        background.add(task)
        task.add_done_callback(background.discard)
        raise


def read_embeddings(items: list[ImageEmbedding | IpcEmbedding], reader: PoolReader) -> list[ImageEmbedding]:
    """`reader.fetch` each item in order; after a failed read, the slots of the rest are released."""
    out: list[ImageEmbedding] = []
    try:
        for item in items:
            out.append(reader.fetch(item))
    finally:
        for item in items[len(out):]:
            reader.release(item)
    return out


async def _release_when_ready(refs: list[Awaitable[Any]], reader: PoolReader) -> None:
    for item in await asyncio.gather(*refs, return_exceptions=True):
        reader.release(item)
