"""CUDA graphs for decode-only steps at bucketed batch sizes and context widths.

Static input buffers sized for the largest bucket; one graph per (batch
bucket, block-table width bucket), captured largest first into a shared memory
pool after an eager warmup run. The paged decode kernel sizes its grid by the
block-table width (context splits), so a graph captured at the widest table
would launch max_model_len / 512 splits per sequence at every step; width
buckets (1,024 tokens, then x4 up to max_model_len) keep the grid close to the
batch's context. A decode batch of B sequences replays the smallest bucket
>= B, the padding rows writing nowhere (slot -1) and attending to one cached
token. Batches larger than the largest bucket, mixed prefill steps and steps
with images run eagerly. Only built on CUDA and without `enforce_eager`.
"""

from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from models.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from engine.decode_inputs import HostDecodeBatch
    from engine.runner import ModelRunner


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


def width_buckets(max_blocks: int, block_size: int) -> list[int]:
    """Block-table widths to capture: 1,024 tokens' worth, then x4, up to max_blocks (always included)."""
    widths, w = [], max(1, 1024 // block_size)
    while w < max_blocks:
        widths.append(w)
        w *= 4
    widths.append(max_blocks)
    return widths


@dataclass(frozen=True, slots=True)
class _Buffers:
    longs: torch.Tensor  # [5 * M] int64: a batch of S uses [:5S] as [5, S] (ids, 3 x position, slot)
    block_tables: torch.Tensor  # [M, max_blocks] int32
    seq_lens: torch.Tensor  # [M] int32
    cu_seqlens: torch.Tensor  # [M + 1] int32 (0..M: one query, and one key as far as the graph knows)
    hidden: torch.Tensor  # [M, H] model dtype

    def longs_of(self, size: int) -> torch.Tensor:
        return self.longs[: 5 * size].view(5, size)

    def metadata(self, size: int, width: int, block_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[: size + 1],
            cu_seqlens_k=self.cu_seqlens[: size + 1],
            max_seqlen_q=1,
            max_seqlen_k=width * block_size,
            slot_mapping=self.longs_of(size)[4],
            block_tables=self.block_tables[:size, :width],
            seq_lens=self.seq_lens[:size],
            decode_only=True,
        )


class DecodeGraphs:
    """Captured decode graphs of one runner."""

    def __init__(self, runner: ModelRunner, buffers: _Buffers, graphs: dict[tuple[int, int], torch.cuda.CUDAGraph]):
        self.runner = runner
        self.buffers = buffers
        self.graphs = graphs
        self.sizes = sorted({size for size, _ in graphs})
        self.widths = sorted({width for _, width in graphs})

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
        longs = torch.zeros(5 * m, dtype=torch.int64, device=dev)
        buf = _Buffers(
            longs=longs,
            block_tables=torch.zeros(m, max_blocks, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(m, dtype=torch.int32, device=dev),
            cu_seqlens=torch.arange(m + 1, dtype=torch.int32, device=dev),
            hidden=torch.zeros(m, hidden_size, dtype=runner.dtype, device=dev),
        )
        graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        pool = None
        for width in reversed(width_buckets(max_blocks, cfg.block_size)):
            for size in reversed(bucket_sizes(m)):
                view = buf.longs_of(size)
                view.zero_()
                view[4].fill_(-1)  # padding rows write nowhere
                attn = buf.metadata(size, width, cfg.block_size)
                args = (view[0], view[1:4], attn, runner.kv_caches, None)
                buf.hidden[:size] = runner.model(*args)  # warmup (lazy inits, autotuning)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    buf.hidden[:size] = runner.model(*args)
                pool = graph.pool() if pool is None else pool
                graphs[(size, width)] = graph
        torch.cuda.synchronize()
        return cls(runner, buf, graphs)

    def batch_bucket(self, batch: int) -> int | None:
        """The captured batch size a decode of `batch` sequences pads to (None: run eagerly)."""
        return next((s for s in self.sizes if s >= batch), None)

    def replay(self, host: HostDecodeBatch, batch: int) -> torch.Tensor | None:
        """Copy a staged decode step (padded to a batch bucket) in and replay its graph.

        Returns hidden [batch, H] (a view of the static output), or None when the
        context is wider than every captured width (the caller runs eagerly).
        """
        width = next((w for w in self.widths if w >= host.width), None)
        if width is None or (host.size, width) not in self.graphs:
            return None
        buf = self.buffers
        buf.longs_of(host.size).copy_(host.longs, non_blocking=True)
        buf.seq_lens[: host.size].copy_(host.seq_lens, non_blocking=True)
        buf.block_tables[: host.size, : host.width].copy_(host.block_tables, non_blocking=True)
        self.runner.decode_inputs.mark_copied()
        self.graphs[(host.size, width)].replay()
        return buf.hidden[:batch]
