"""CUDA graphs for decode-only steps at bucketed batch sizes and context widths.

Static input buffers sized for the largest bucket; one graph per (batch
bucket, block-table width bucket), captured largest first into a shared memory
pool after an eager warmup run. The paged decode kernel sizes its grid by the
block-table width (context splits), so a graph captured at the widest table
would launch max_model_len / 512 splits per sequence at every step; width
buckets (1,024 tokens, then x4 up to max_model_len) keep the grid close to the
batch's context. The graph runs the LM head too: it ends with the
step's logits (model dtype) and their argmax (the greedy tokens) in static
buffers, so a greedy step launches nothing but the graph and reads B ids back.
A decode batch of B sequences replays the smallest bucket
>= B, the padding rows writing nowhere (KV slot -1) and attending to one cached
token. Hybrid models' linear-attention states are pools addressed by the static
`state_indices` (padding rows: slot -1, which the kernels neither read nor
write); every decode row continues its slot, so the metadata says so with
`has_initial_state=None` rather than a tensor the model would have to inspect.
Batches larger than the largest bucket, mixed prefill steps and steps with
images run eagerly. Whether a model is captured at all is the runner's
`captures_decode_graphs()`; the forward it captures is the runner's too.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.decode_inputs import HostDecodeBatch
from models.layers.attention import AttentionMetadata

# (input_ids [B], positions [3, B], attn) -> logits [B, V] in the model dtype: the decoder over the
# runner's caches and its LM head.
DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


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
class StaticInputs:
    """The captured graphs' input and output buffers, sized for the largest bucket.

    A step of S rows and table width W uses the leading `[:S]` / `[:S, :W]` views.
    """

    block_size: int
    longs: torch.Tensor  # [5 * M] int64: a batch of S uses [:5S] as [5, S] (ids, 3 x position, KV slot)
    ints: torch.Tensor  # [2 * M] int32: a batch of S uses [:2S] as [2, S] (context length, state slot)
    block_tables: torch.Tensor  # [M, max_blocks] int32
    cu_seqlens: torch.Tensor  # [M + 1] int32 (0..M: one query, and one key as far as the graph knows)
    logits: torch.Tensor  # [M, V] model dtype (output)
    token_ids: torch.Tensor  # [M] int64 (output): argmax of each logits row, first maximum on ties

    @classmethod
    def allocate(cls, max_rows: int, max_model_len: int, block_size: int, vocab_size: int,
                 dtype: torch.dtype, device: torch.device) -> StaticInputs:
        max_blocks = -(-max_model_len // block_size)
        return cls(
            block_size=block_size,
            longs=torch.zeros(5 * max_rows, dtype=torch.int64, device=device),
            ints=torch.ones(2 * max_rows, dtype=torch.int32, device=device),
            block_tables=torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device),
            cu_seqlens=torch.arange(max_rows + 1, dtype=torch.int32, device=device),
            logits=torch.zeros(max_rows, vocab_size, dtype=dtype, device=device),
            token_ids=torch.zeros(max_rows, dtype=torch.int64, device=device),
        )

    @property
    def max_rows(self) -> int:
        return self.block_tables.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def longs_of(self, size: int) -> torch.Tensor:
        return self.longs[: 5 * size].view(5, size)

    def ints_of(self, size: int) -> torch.Tensor:
        return self.ints[: 2 * size].view(2, size)

    def metadata(self, size: int, width: int) -> AttentionMetadata:
        """Decode metadata over the leading views; models without state slots ignore `state_indices`."""
        ints = self.ints_of(size)
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[: size + 1],
            cu_seqlens_k=self.cu_seqlens[: size + 1],
            max_seqlen_q=1,
            max_seqlen_k=width * self.block_size,
            slot_mapping=self.longs_of(size)[4],
            block_tables=self.block_tables[:size, :width],
            seq_lens=ints[0],
            decode_only=True,
            state_indices=ints[1],
            has_initial_state=None,
        )

    def fill_padding(self, size: int) -> None:
        """Rows that attend to one cached token and write nowhere (KV and state slot -1): what capture runs."""
        view, ints = self.longs_of(size), self.ints_of(size)
        view.zero_()
        view[4].fill_(-1)
        ints[0].fill_(1)
        ints[1].fill_(-1)

    def run(self, forward: DecodeForward, size: int, width: int) -> None:
        """One decode step over the leading views into the static outputs (what a graph captures)."""
        view = self.longs_of(size)
        self.logits[:size] = forward(view[0], view[1:4], self.metadata(size, width))
        torch.argmax(self.logits[:size], dim=-1, out=self.token_ids[:size])

    def load(self, host: HostDecodeBatch) -> None:
        """Copy a staged decode step in (asynchronously from pinned memory)."""
        self.longs_of(host.size).copy_(host.longs, non_blocking=True)
        self.ints_of(host.size).copy_(host.ints, non_blocking=True)
        self.block_tables[: host.size, : host.width].copy_(host.block_tables, non_blocking=True)


class DecodeGraphs:
    """Captured decode graphs keyed by (batch bucket, block-table width bucket)."""

    def __init__(self, inputs: StaticInputs, graphs: dict[tuple[int, int], torch.cuda.CUDAGraph]):
        self.inputs = inputs
        self.graphs = graphs
        self.sizes = sorted({size for size, _ in graphs})
        self.widths = sorted({width for _, width in graphs})

    @classmethod
    def capture(cls, forward: DecodeForward, inputs: StaticInputs) -> DecodeGraphs | None:
        """Capture every bucket; on any failure warn and return None (eager decode)."""
        try:
            return cls._capture(forward, inputs)
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
    def _capture(cls, forward: DecodeForward, buf: StaticInputs) -> DecodeGraphs:
        graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        pool = None
        for width in reversed(width_buckets(buf.max_blocks, buf.block_size)):
            for size in reversed(bucket_sizes(buf.max_rows)):
                buf.fill_padding(size)
                buf.run(forward, size, width)  # warmup (lazy inits, autotuning)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    buf.run(forward, size, width)
                pool = graph.pool() if pool is None else pool
                graphs[(size, width)] = graph
        torch.cuda.synchronize()
        return cls(buf, graphs)

    def batch_bucket(self, batch: int) -> int | None:
        """The captured batch size a decode of `batch` sequences pads to (None: run eagerly)."""
        return next((s for s in self.sizes if s >= batch), None)

    def replay(self, host: HostDecodeBatch, batch: int,
               on_copied: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Copy a staged decode step (padded to a batch bucket) in and replay its graph.

        `on_copied` runs once the copies out of `host` are enqueued (the staging
        arrays must outlive them). Returns (logits [batch, V], greedy token ids
        [batch]), views of the static outputs valid until the next replay, or None
        when the context is wider than every captured width (the caller runs eagerly).
        """
        width = next((w for w in self.widths if w >= host.width), None)
        if width is None or (host.size, width) not in self.graphs:
            return None
        self.inputs.load(host)
        on_copied()
        self.graphs[(host.size, width)].replay()
        return self.inputs.logits[:batch], self.inputs.token_ids[:batch]
