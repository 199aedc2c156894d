"""Vocab-parallel token embedding and LM head.

Rank r holds rows `[r * per_rank, min((r + 1) * per_rank, vocab))` with
`per_rank = ceil(vocab / tp)`; the last rank's spare rows are zero padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.linear import ShardSpec
from models.layers.parallel import SINGLE, ParallelContext, all_gather, all_reduce


class VocabParallelEmbedding(nn.Module):
    """Shapes: ids [T] int64 -> [T, embedding_dim]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.parallel = parallel or SINGLE
        tp, rank = self.parallel.tp_size, self.parallel.tp_rank
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.per_rank = -(-num_embeddings // tp)
        self.vocab_start = min(rank * self.per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.shard_spec = self.shard_spec

    def shard_spec(self, shard_id: None = None) -> ShardSpec:
        full = (self.num_embeddings, self.embedding_dim)
        if self.parallel.tp_size == 1:
            return ShardSpec(full)
        return ShardSpec(full, 0, self.vocab_start, self.vocab_end - self.vocab_start)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        rows = self.shard_spec().take(loaded)
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        ids = (input_ids - self.vocab_start) * local  # out-of-shard ids read row 0, then are zeroed
        out = F.embedding(ids, self.weight) * local.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.parallel)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection; tie it by sharing the embedding's weight.

    Shapes: `compute_logits(hidden [N, H]) -> [N, vocab]` in `dtype`, full vocab on every rank.
    `dtype=None` keeps the weight's dtype: the engine's samplers take those logits as they
    are (a greedy argmax needs no fp32 copy: the same values, so the same index).
    """

    def compute_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        logits = all_gather(logits, self.parallel, dim=-1)[..., : self.num_embeddings]
        return logits if dtype is None else logits.to(dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden)
