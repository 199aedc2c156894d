"""The embedding pool's slot bookkeeping and the consumer's fetch/release, on CPU tensors.

The CUDA IPC open is the only part replaced (the reader gets the producer's CPU
buffer); allocation, generations, leases, stale handles and abort release are the
code the GPU path runs. tests/deployments/test_gpu_serve.py opens real IPC handles.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.embedding_pool import EmbeddingPool, PoolReader, fetch_embeddings
from deployments.embedding_transfer import ALIGN, ImageEmbedding, PoolAddress, SlotAllocator, SlotTable
from deployments.errors import EncoderUnavailableError

NODE = "node-a"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table():
    t = SlotTable(None, slots=4)
    yield t
    t.close()


def make_pool(capacity: int, slots: int = 8, lease_s: float = 60.0) -> EmbeddingPool:
    table = SlotTable(None, slots)
    buffer = torch.zeros(capacity, dtype=torch.uint8)
    return EmbeddingPool(buffer, PoolAddress(table.name, NODE, "uuid-0", ()), table, lease_s)


def reader_of(pool: EmbeddingPool, node: str = NODE) -> PoolReader:
    return PoolReader(node, torch.device("cpu"), open_buffer=lambda address: pool.buffer)


def image(tokens: int, hidden: int = 8, levels: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, hidden, generator=g).to(torch.bfloat16),
            torch.randn(levels, tokens, hidden, generator=g).to(torch.bfloat16))


def test_allocator_fills_without_overlap_and_reclaims_done_slots(table):
    alloc = SlotAllocator(4 * ALIGN, table, lease_s=60.0)
    got = [alloc.allocate(ALIGN - 8) for _ in range(4)]
    assert all(g is not None for g in got)
    offsets = sorted(offset for _, offset, _ in got)
    assert offsets == [0, ALIGN, 2 * ALIGN, 3 * ALIGN]
    assert len({gen for _, _, gen in got}) == 4
    assert alloc.allocate(1) is None  # full: no slot id left, nothing done
    slot, offset, gen = got[1]
    table.mark_done(slot, gen - 1)  # a stale generation frees nothing
    assert alloc.allocate(1) is None
    table.mark_done(slot, gen)
    again = alloc.allocate(ALIGN)
    assert again is not None and again[1] == offset and again[2] > max(g for _, _, g in got)
    assert table.issued(again[0]) == again[2]


def test_allocator_first_fit_between_live_ranges(table):
    alloc = SlotAllocator(9 * ALIGN, table, lease_s=60.0)
    a = alloc.allocate(2 * ALIGN)
    b = alloc.allocate(3 * ALIGN)
    c = alloc.allocate(2 * ALIGN)
    assert (a[1], b[1], c[1]) == (0, 2 * ALIGN, 5 * ALIGN)
    table.mark_done(b[0], b[2])
    assert alloc.allocate(4 * ALIGN) is None  # b's gap (3) and the tail (2) are both too small
    assert table.issued(b[0]) == -1  # ... but b was reclaimed trying
    d = alloc.allocate(3 * ALIGN)
    assert d is not None and d[1] == 2 * ALIGN
    assert alloc.bytes_in_use() == 7 * ALIGN


def test_lease_expiry_reclaims_a_slot_never_released(table):
    clock = Clock()
    alloc = SlotAllocator(2 * ALIGN, table, lease_s=5.0, clock=clock)
    first = alloc.allocate(2 * ALIGN)
    assert alloc.allocate(ALIGN) is None
    clock.now = 4.0
    assert alloc.allocate(ALIGN) is None
    clock.now = 6.0
    second = alloc.allocate(ALIGN)
    assert second is not None
    assert table.issued(first[0]) != first[2]  # the old handle is invalid now


def test_pool_to_reader_equal_and_slot_done():
    pool = make_pool(64 * ALIGN)
    reader = reader_of(pool)
    e, d = image(6)
    handle = pool.store(e, d, (1, 4, 6))
    assert handle is not None and handle.num_tokens == 6
    got = reader.fetch(handle)
    assert isinstance(got, ImageEmbedding) and got.grid_thw == (1, 4, 6)
    assert torch.equal(got.embeds, e) and torch.equal(got.deepstack, d)
    assert got.embeds.data_ptr() != pool.buffer.data_ptr()  # a copy: the slot can be reused
    assert pool.table.rows[handle.slot, 1] == handle.generation
    assert pool.allocator.reclaim() == 1 and pool.allocator.bytes_in_use() == 0
    pool.close()


def test_full_pool_returns_none_and_a_reused_slot_is_stale():
    e, d = image(16, hidden=16)
    pool = make_pool(e.numel() * 2 + d.numel() * 2 + ALIGN, slots=4)
    reader = reader_of(pool)
    first = pool.store(e, d, (1, 8, 8))
    assert first is not None
    assert pool.store(e, d, (1, 8, 8)) is None  # full: the caller takes the object store
    assert torch.equal(reader.fetch(first).embeds, e)
    e2, d2 = image(16, hidden=16, seed=1)
    second = pool.store(e2, d2, (1, 8, 8))  # reclaims the done slot, overwrites its bytes
    assert second is not None
    with pytest.raises(EncoderUnavailableError):
        reader.fetch(first)  # e.g. a stale router cache entry: the router re-encodes
    assert torch.equal(reader.fetch(second).deepstack, d2)
    pool.close()


def test_reader_elsewhere_refuses_the_handle_but_releases_on_its_node():
    pool = make_pool(64 * ALIGN)
    handle = pool.store(*image(4), (1, 4, 4))
    with pytest.raises(EncoderUnavailableError):
        reader_of(pool, node="node-b").fetch(handle)
    cpu_replica = PoolReader(NODE, None)
    with pytest.raises(EncoderUnavailableError):
        cpu_replica.fetch(handle)
    assert pool.allocator.reclaim() == 0
    cpu_replica.release(handle)
    assert pool.allocator.reclaim() == 1
    pool.close()


class _Ref:
    """An ObjectRef stand-in that resolves when `event` is set."""

    def __init__(self, value, event: asyncio.Event):
        self.value, self.event = value, event

    def __await__(self):
        return self._get().__await__()

    async def _get(self):
        await self.event.wait()
        return self.value


def test_abort_mid_transfer_frees_the_slots():
    pool = make_pool(64 * ALIGN)
    handles = [pool.store(*image(4, seed=i), (1, 4, 4)) for i in range(2)]

    async def run() -> None:
        ready = asyncio.Event()
        background: set[asyncio.Task] = set()
        refs = [_Ref(handles[0], asyncio.Event()), _Ref(handles[1], ready)]
        refs[0].event.set()
        task = asyncio.create_task(fetch_embeddings(refs, reader_of(pool), background))
        await asyncio.sleep(0.01)
        task.cancel()  # the client left while the second embedding was still coming
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(background) == 1 and pool.allocator.reclaim() == 0
        ready.set()
        await asyncio.gather(*background)

    asyncio.run(run())
    assert pool.allocator.reclaim() == 2 and pool.allocator.bytes_in_use() == 0
    pool.close()


def test_failed_read_releases_the_handles_after_it():
    pool = make_pool(64 * ALIGN)
    handles = [pool.store(*image(4, seed=i), (1, 4, 4)) for i in range(3)]
    pool.table.rows[handles[1].slot, 0] = -1  # the second was evicted meanwhile

    async def run() -> list:
        ready = asyncio.Event()
        ready.set()
        return await fetch_embeddings([_Ref(h, ready) for h in handles], reader_of(pool), set())

    with pytest.raises(EncoderUnavailableError):
        asyncio.run(run())
    done = [pool.table.rows[h.slot, 1] == h.generation for h in handles]
    assert done == [True, True, True]
    pool.close()
