"""CUDA graphs for decode-only steps at bucketed batch sizes (nano-vllm's scheme).

Static input buffers sized for the largest bucket; one graph per bucket,
captured largest first into a shared memory pool after an eager warmup run.
A decode batch of B sequences replays the smallest bucket >= B with the
padding rows writing nowhere (slot -1) and attending to one cached token.
Batches larger than the largest bucket, mixed prefill steps and steps with
images run eagerly. Only built on CUDA and without `enforce_eager`.
"""

from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from models.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from engine.runner import ModelRunner, StepBatch


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass(frozen=True, slots=True)
class _Buffers:
    input_ids: torch.Tensor  # [M] int64
    positions: torch.Tensor  # [3, M] int64
    slot_mapping: torch.Tensor  # [M] int64
    block_tables: torch.Tensor  # [M, max_blocks] int32
    seq_lens: torch.Tensor  # [M] int32
    cu_seqlens_q: torch.Tensor  # [M + 1] int32
    cu_seqlens_k: torch.Tensor  # [M + 1] int32
    hidden: torch.Tensor  # [M, H] model dtype

    def metadata(self, size: int, max_model_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            cu_seqlens_k=self.cu_seqlens_k[: size + 1],
            max_seqlen_q=1,
            max_seqlen_k=max_model_len,
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            decode_only=True,
        )


class DecodeGraphs:
    """Captured decode graphs of one runner."""

    def __init__(self, runner: ModelRunner, buffers: _Buffers, graphs: dict[int, torch.cuda.CUDAGraph]):
        self.runner = runner
        self.buffers = buffers
        self.graphs = graphs
        self.sizes = sorted(graphs)

    @classmethod
    def capture(cls, runner: ModelRunner, max_model_len: int) -> DecodeGraphs | None:
        """Capture every bucket; on any failure warn and return None (eager decode)."""
        try:
            return cls._capture(runner, max_model_len)
        except Exception as exc:  # a model op that cannot be captured: run eagerly
            frames = traceback.extract_tb(exc.__traceback__)
            ours = [f for f in frames if "site-packages" not in f.filename and "/torch/" not in f.filename]
            where = (ours or frames)[-1]
            warnings.warn(f"CUDA graph capture failed, decode runs eagerly: {exc} "
                          f"(at {where.filename}:{where.lineno} in {where.name})", RuntimeWarning, stacklevel=2)
            torch.cuda.synchronize()
            return None

    @classmethod
    @torch.inference_mode()
    def _capture(cls, runner: ModelRunner, max_model_len: int) -> DecodeGraphs:
        cfg, dev = runner.config, runner.device
        m = cfg.max_num_seqs
        max_blocks = -(-max_model_len // cfg.block_size)
        hidden_size = runner.model_config.text.hidden_size
        buf = _Buffers(
            input_ids=torch.zeros(m, dtype=torch.int64, device=dev),
            positions=torch.zeros(3, m, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((m,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(m, max_blocks, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(m, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.arange(m + 1, dtype=torch.int32, device=dev),
            cu_seqlens_k=torch.arange(m + 1, dtype=torch.int32, device=dev),
            hidden=torch.zeros(m, hidden_size, dtype=runner.dtype, device=dev),
        )
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for size in reversed(bucket_sizes(m)):
            attn = buf.metadata(size, max_model_len)
            args = (buf.input_ids[:size], buf.positions[:, :size], attn, runner.kv_caches, None)
            buf.hidden[:size] = runner.model(*args)  # warmup (lazy inits, autotuning)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                buf.hidden[:size] = runner.model(*args)
            pool = graph.pool() if pool is None else pool
            graphs[size] = graph
        torch.cuda.synchronize()
        return cls(runner, buf, graphs)

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        """Replay the bucket for this decode batch; None if it is larger than every bucket."""
        b = batch.input_ids.shape[0]
        size = next((s for s in self.sizes if s >= b), None)
        if size is None:
            return None
        buf = self.buffers
        width = batch.attn.block_tables.shape[1]
        if width > buf.block_tables.shape[1]:
            return None
        buf.input_ids[:b].copy_(batch.input_ids)
        buf.positions[:, :b].copy_(batch.positions)
        buf.slot_mapping[:b].copy_(batch.attn.slot_mapping)
        buf.slot_mapping[b:size].fill_(-1)
        buf.block_tables[:b, :width].copy_(batch.attn.block_tables)
        buf.seq_lens[:b].copy_(batch.attn.seq_lens)
        buf.seq_lens[b:size].fill_(1)
        self.graphs[size].replay()
        return buf.hidden[:b]
