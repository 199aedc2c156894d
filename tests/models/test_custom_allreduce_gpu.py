"""The one-shot CUDA IPC all-reduce on 2+ GPUs, one spawned process per rank.

References: an fp32 sum of every rank's input in rank order with one rounding (all_gather over
NCCL; the kernel's exact semantics, so any world size compares bit for bit), and NCCL's own
all-reduce (bit-exact with two ranks: a + b rounded once either way). Calls run back to back
without host syncs and mixed in size (the per-block flags must not race across calls), and
inside a captured CUDA graph replayed with new inputs (the device-side call counter).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu

SIZES = (8, 4096, 5 * 4096 + 8, 64 * 4096, 256 * 1024)  # elements; the last two fill the 512 KB slot
DTYPES = (torch.bfloat16, torch.float16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _needs(world: int) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")


def _inputs(rank: int, count: int, size: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    return [torch.randn(size, generator=gen).mul(4).to(dtype).cuda() for _ in range(count)]


def _reference(x: torch.Tensor, world: int) -> torch.Tensor:
    """fp32 sum of every rank's `x` in rank order, one rounding to x's dtype."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    acc = parts[0].float()
    for p in parts[1:]:
        acc = acc + p.float()
    return acc.to(x.dtype)


def _nccl(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    y = x.clone()
    dist.all_reduce(y)
    return y


def _check(got: torch.Tensor, x: torch.Tensor, world: int, what: str) -> None:
    ref = _reference(x, world)
    assert torch.equal(got, ref), f"{what}: max diff {(got.float() - ref.float()).abs().max().item()}"
    if world == 2:
        assert torch.equal(got, _nccl(x)), f"{what}: differs from NCCL"


def _sizes_and_back_to_back(car, rank: int, world: int) -> None:
    for dtype in DTYPES:
        for size in SIZES:
            x = _inputs(rank, 1, size, dtype, seed=size)[0]
            assert car.fits(x)
            got = car.all_reduce_(x.clone())
            _check(got, x, world, f"{dtype} {size}")
    too_big = torch.zeros(256 * 1024 + 8, dtype=torch.bfloat16, device="cuda")
    assert not car.fits(too_big) and not car.fits(torch.zeros(64, device="cuda"))  # NCCL's rows
    # 300 calls of changing sizes queued without a host sync, then checked.
    sizes = [SIZES[i % len(SIZES)] if i % 7 else 4096 for i in range(300)]
    xs = [_inputs(rank, 1, n, torch.bfloat16, seed=10_000 + i)[0] for i, n in enumerate(sizes)]
    torch.cuda.synchronize()
    outs = [car.all_reduce_(x.clone()) for x in xs]
    for i, (x, got) in enumerate(zip(xs, outs)):
        _check(got, x, world, f"back-to-back call {i}")


def _graph_replays(car, rank: int, world: int) -> None:
    """Two all-reduces per captured step (as a decoder layer), replayed 100 times with new rows."""
    a = torch.zeros(4, 4096, dtype=torch.bfloat16, device="cuda")
    b = torch.zeros(1, 4096, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        car.all_reduce_(a)  # warm-up outside the capture, as the engine does
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        car.all_reduce_(a)
        b.add_(a[:1]).mul_(0.5)
        car.all_reduce_(b)
    ins_a = _inputs(rank, 100, 4 * 4096, torch.bfloat16, seed=20_000)
    ins_b = _inputs(rank, 100, 4096, torch.bfloat16, seed=30_000)
    outs = []
    for xa, xb in zip(ins_a, ins_b):
        a.copy_(xa.view(4, 4096))
        b.copy_(xb.view(1, 4096))
        graph.replay()
        outs.append((a.clone(), b.clone()))
    for i, (xa, xb) in enumerate(zip(ins_a, ins_b)):
        ra = _reference(xa, world).view(4, 4096)
        assert torch.equal(outs[i][0], ra), f"replay {i}: first all-reduce"
        rb = _reference(xb.view(1, 4096).add(ra[:1]).mul(0.5).view(-1), world).view(1, 4096)
        assert torch.equal(outs[i][1], rb), f"replay {i}: second all-reduce"


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from models.layers.custom_allreduce import CustomAllReduce

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        car = CustomAllReduce.create(dist.group.WORLD, torch.device("cuda", rank))
        assert car is not None, "the one-shot path is off (see the warning above)"
        _sizes_and_back_to_back(car, rank, world)
        _graph_replays(car, rank, world)
        torch.cuda.synchronize()
        dist.barrier()
        car.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4, 8])
def test_one_shot_all_reduce_matches_references(world):
    _needs(world)
    import torch.multiprocessing as mp

    assert os.environ.get("NCCL_NVLS_ENABLE", "0") == "0", "NVLink multicast must stay off"
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)
