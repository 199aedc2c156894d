"""Tensor parallelism: a TP=2 forward over gloo (two processes) equals the TP=1 forward."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import load_model_config
from models.interface import MultimodalBatch
from models.layers.attention import AttentionMetadata
from models.layers.parallel import ParallelContext
from models.loader import CheckpointReader
from models.qwen3 import Qwen3ForCausalLM

BLOCK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(model_dir: Path):
    """Deterministic prompt with 6 'image' tokens plus random vision embeddings."""
    config = load_model_config(model_dir)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (14,), generator=gen)
    mask = torch.zeros(14, dtype=torch.bool)
    mask[4:10] = True
    ids[mask] = config.image_token_id
    h = config.text.hidden_size
    mm = MultimodalBatch(torch.randn(6, h, generator=gen), torch.randn(2, 6, h, generator=gen), mask)
    positions = torch.stack([torch.arange(14), torch.arange(14) * 2 % 5, torch.arange(14) % 3])
    return config, ids, positions, mm


@torch.no_grad()
def _run(model_dir: Path, parallel: ParallelContext) -> torch.Tensor:
    """Logits of a no-cache full run, then the same prompt prefilled into paged caches + 2 decode steps."""
    config, ids, positions, mm = _inputs(model_dir)
    model = Qwen3ForCausalLM(config, parallel)
    model.load_weights(CheckpointReader(model_dir))
    full = model.compute_logits(model(ids, positions, AttentionMetadata.packed([14]), None, mm))
    shape = (8, BLOCK, model.num_kv_heads, config.text.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.text.num_hidden_layers)]
    table = torch.tensor([[3, 0, 6, 2]], dtype=torch.int32)
    slots = lambda a, b: torch.tensor([int(table[0, p // BLOCK]) * BLOCK + p % BLOCK for p in range(a, b)])  # noqa: E731
    cu = lambda n: torch.tensor([0, n], dtype=torch.int32)  # noqa: E731
    meta = AttentionMetadata(cu(12), cu(12), 12, 12, slots(0, 12), table, torch.tensor([12], dtype=torch.int32))
    steps = [model.compute_logits(model(ids[:12], positions[:, :12], meta, caches, mm and MultimodalBatch(
        mm.embeds, mm.deepstack, mm.mask[:12])))]
    for p in (12, 13):
        meta = AttentionMetadata(cu(1), cu(p + 1), 1, p + 1, slots(p, p + 1), table,
                                 torch.tensor([p + 1], dtype=torch.int32), decode_only=True)
        steps.append(model.compute_logits(model(ids[p : p + 1], positions[:, p : p + 1], meta, caches, None)))
    return torch.stack([full, torch.cat(steps)])


def _gloo_worker(rank: int, world: int, port: int, run, paths: list[str], out: str) -> None:
    """One rank: `run(path, parallel)` for each checkpoint, saved to `{out}.{i}.{rank}`."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for i, path in enumerate(paths):
        torch.save(run(Path(path), ParallelContext(rank, world, dist.group.WORLD)), f"{out}.{i}.{rank}")
    dist.barrier()  # both ranks are done talking
    # Leave without tearing gloo down: destroying it (or the interpreter's exit doing so)
    # while the peer closes its side can std::terminate one of gloo's threads (a rare
    # SIGABRT at exit in CI). The results are on disk already.
    os._exit(0)


def spawn_tp2(run, paths: list, out: str) -> None:
    """`run` on 2 gloo ranks in 2 processes, for each of `paths`."""
    mp.spawn(_gloo_worker, args=(2, _free_port(), run, [str(p) for p in paths], out), nprocs=2, join=True)


@pytest.mark.timeout(180)
def test_tp2_over_gloo_equals_tp1(tiny_checkpoint, tmp_path) -> None:
    """Dense and MoE in one pair of processes (process start-up dominates the run time)."""
    archs = ["qwen3_vl", "qwen3_vl_moe"]
    model_dirs = [tiny_checkpoint(arch) for arch in archs]
    out = str(tmp_path / "logits")
    spawn_tp2(_run, model_dirs, out)
    for i, (arch, model_dir) in enumerate(zip(archs, model_dirs)):
        reference = _run(model_dir, ParallelContext())
        for rank in range(2):
            logits = torch.load(f"{out}.{i}.{rank}")
            assert logits.shape == reference.shape, arch  # full vocab on every rank
            torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4, msg=f"{arch} rank {rank}")
        # The cached path agrees with the full run (within each TP size).
        torch.testing.assert_close(reference[1], reference[0], atol=1e-4, rtol=1e-4, msg=arch)
