"""The custom all-reduce's decisions and plumbing, without GPUs: which rows take the one-shot
kernel, when a rank must fall back to NCCL, the config fields, the worker's device choice, and
`all_reduce` routing. The kernel itself: tests/models/test_custom_allreduce_gpu.py."""

from __future__ import annotations

import pydantic
import pytest
import torch

from deployments.config import LLMDeploymentConfig
from engine.config import EngineConfig
from engine.worker import uses_custom_all_reduce, visible_index
from models.layers import parallel
from models.layers.custom_allreduce import (
    DEFAULT_MAX_BYTES,
    fits_one_shot,
    peer_device_indices,
    unusable_reason,
)
from models.layers.parallel import ParallelContext


@pytest.mark.parametrize(
    ("nbytes", "dtype", "contiguous", "address", "fits"),
    [
        (8192, torch.bfloat16, True, 256, True),  # one 4096-wide bf16 row
        (2048 * 256, torch.float16, True, 0, True),  # exactly the limit
        (2048 * 256 + 16, torch.bfloat16, True, 0, False),  # over the limit: NCCL
        (8192, torch.float32, True, 0, False),  # fp32: NCCL
        (8192, torch.bfloat16, False, 0, False),
        (8200, torch.bfloat16, True, 0, False),  # not whole 16-byte packs
        (8192, torch.bfloat16, True, 8, False),  # misaligned view
        (0, torch.bfloat16, True, 0, False),
    ],
)
def test_fits_one_shot(nbytes, dtype, contiguous, address, fits):
    assert fits_one_shot(nbytes, dtype, contiguous, address, DEFAULT_MAX_BYTES) is fits


def test_peer_device_indices_by_uuid():
    local = ["gpu-a", "gpu-b", "gpu-c"]
    assert peer_device_indices(local, ["gpu-c", "gpu-a"]) == [2, 0]
    assert peer_device_indices(["gpu-a"], ["gpu-a", "gpu-b"]) is None  # the peer's GPU is hidden here
    assert peer_device_indices(local, ["gpu-a", "gpu-a"]) is None  # two ranks on one GPU


def _reason(world=2, uuids=("u0", "u1"), local=("u0", "u1"), device=torch.device("cuda", 0),
            access=lambda a, b: True, extension=True):
    return unusable_reason(device, world, list(uuids), list(local), access, extension)


def test_unusable_reason():
    assert _reason() is None
    assert _reason(world=4, uuids=("u0", "u1", "u2", "u3"), local=("u0", "u1", "u2", "u3")) is None
    assert "not CUDA" in _reason(device=torch.device("cpu"))
    assert "world size 9" in _reason(world=9)
    assert "world size 1" in _reason(world=1, uuids=("u0",))
    assert "visible" in _reason(local=("u0",))
    assert "P2P" in _reason(access=lambda a, b: (a, b) != (0, 1))
    assert "extension" in _reason(extension=False)
    # The rank's own GPU is never asked about (peer access to itself is not a thing).
    asked = []
    _reason(device=torch.device("cuda", 1), access=lambda a, b: asked.append((a, b)) or True)
    assert asked == [(1, 0)]


def test_engine_config_field():
    assert EngineConfig(model="m").custom_all_reduce is False
    with pytest.raises(ValueError, match="custom_all_reduce must be a bool"):
        EngineConfig(model="m", custom_all_reduce="yes")
    on = EngineConfig(model="m", tensor_parallel_size=2, custom_all_reduce=True)
    assert uses_custom_all_reduce(on)
    # Ignored with one rank or on CPU (no IPC there): those configs stay valid.
    assert not uses_custom_all_reduce(EngineConfig(model="m", custom_all_reduce=True))
    cpu = EngineConfig(model="m", device="cpu", tensor_parallel_size=2, custom_all_reduce=True)
    assert not uses_custom_all_reduce(cpu)
    assert not uses_custom_all_reduce(EngineConfig(model="m", tensor_parallel_size=2))


def test_yaml_field_reaches_the_engine_config():
    from deployments.config import AppConfig
    from deployments.llm import engine_config_values

    assert LLMDeploymentConfig().custom_all_reduce is False
    with pytest.raises(pydantic.ValidationError):
        LLMDeploymentConfig(custom_all_reduce="sometimes")
    app = AppConfig.model_validate({"model": "org/m", "llm": {"tensor_parallel_size": 2, "custom_all_reduce": True}})
    assert engine_config_values(app, "/ckpt")["custom_all_reduce"] is True


def test_visible_index():
    assert visible_index("3", None) == 3
    assert visible_index("5", "4,5,6") == 1
    assert visible_index("GPU-abc", "GPU-xyz, GPU-abc") == 1
    with pytest.raises(RuntimeError, match="not in CUDA_VISIBLE_DEVICES"):
        visible_index("2", "0,1")


class _Recorder:
    """Stands in for CustomAllReduce: takes rows of at most `limit` elements, adds 100."""

    def __init__(self, limit: int):
        self.limit, self.calls = limit, 0

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() <= self.limit

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.add_(100)


def test_all_reduce_routes_by_fit(monkeypatch):
    sent = []
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda x, op, group: sent.append(x.numel()))
    custom = _Recorder(limit=8)
    ctx = ParallelContext(0, 2, None, custom)
    small = torch.zeros(8)
    assert parallel.all_reduce(small, ctx) is small and small.eq(100).all() and custom.calls == 1
    big = torch.zeros(9)
    assert parallel.all_reduce(big, ctx) is big and big.eq(0).all() and sent == [9]
    # Without one (the default) every row goes to torch.distributed; one rank calls nothing.
    parallel.all_reduce(torch.zeros(4), ParallelContext(0, 2))
    parallel.all_reduce(torch.zeros(4), ParallelContext(0, 1, None, custom))
    assert sent == [9, 4] and custom.calls == 1


def _gloo_rank(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from models.layers.custom_allreduce import CustomAllReduce
    from ops import reference_comm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Collective and unanimous: off on every rank (no CUDA here), so all_reduce stays on gloo.
        assert CustomAllReduce.create(dist.group.WORLD, torch.device("cpu")) is None
        x = torch.arange(8, dtype=torch.float32) * (rank + 1)
        reference_comm.custom_all_reduce(x, torch.empty(0), [0] * world, rank)
        assert torch.equal(x, torch.arange(8, dtype=torch.float32) * sum(range(1, world + 1)))
        with pytest.raises(RuntimeError, match="CUDA IPC"):
            reference_comm.custom_ar_export(torch.empty(0))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_create_is_off_on_every_cpu_rank_and_the_reference_sums():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(2, port), nprocs=2, join=True)


def test_buffer_and_reduce_ops_refuse_cpu_tensors():
    """The CPU kernels (or, without the extension, the references) raise rather than pretend."""
    import ops

    buffer = torch.zeros(4096 + 2 * 1024, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.custom_ar_export(buffer)
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.custom_ar_open(torch.zeros(2, 72, dtype=torch.uint8), buffer, 0)
    if ops.extension_available():  # the reference is torch.distributed's all-reduce (no group here)
        with pytest.raises(RuntimeError, match="CUDA only"):
            ops.custom_all_reduce(torch.zeros(8, dtype=torch.bfloat16), buffer, [0, 0], 0)
