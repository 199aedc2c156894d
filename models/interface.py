"""What the engine relies on from a language model, and the types it passes in.

Every decoder class named in `models/architectures.py` meets `LanguageModel`;
the engine (runner, KV-cache sizing, CUDA graphs) uses nothing else of it.
Construction is `cls(config: ModelConfig, parallel: ParallelContext, dtype, device)`
(`models.registry.build_language_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from models.layers.attention import AttentionMetadata
    from models.loader import CheckpointReader

# One decoder layer's cache: paged (key_cache, value_cache) for full attention,
# (conv_state, recurrent_state) slot pools for linear attention.
LayerCache = tuple[torch.Tensor, torch.Tensor]
# Per-slot (conv state, recurrent state) shapes of a linear-attention layer.
StateShapes = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class MultimodalBatch:
    """Vision inputs of one step, aligned with its tokens.

    Shapes: embeds [N, H] (one row per True in `mask`, in order);
    deepstack [L, N, H] or None; mask [T] bool over the step's tokens.
    Rows of `embeds` replace the token embeddings where `mask`; after decoder
    layer `l < L`, `deepstack[l]` is added at the same rows.
    """

    embeds: torch.Tensor
    deepstack: torch.Tensor | None
    mask: torch.Tensor
    index: torch.Tensor | None = None  # [N] int64: `mask`'s True positions, when the caller has them

    def rows(self, num_tokens: int, hidden: int) -> torch.Tensor:
        """Indices [N] of the masked (image) tokens, after checking the shapes against
        a step of `num_tokens` tokens and hidden size `hidden`. `index`, when given, saves the
        device `nonzero` (a host sync: it would wait for the step still running on the GPU)."""
        if self.mask.shape != (num_tokens,) or self.mask.dtype != torch.bool:
            raise ValueError(f"mm.mask must be bool [{num_tokens}], got {self.mask.dtype} {list(self.mask.shape)}")
        rows = self.index if self.index is not None else self.mask.nonzero().squeeze(1)
        if self.embeds.shape != (rows.numel(), hidden):
            raise ValueError(f"mm.embeds must be [{rows.numel()}, {hidden}] (one row per masked token), "
                             f"got {list(self.embeds.shape)}")
        deep = self.deepstack
        if deep is not None and (deep.dim() != 3 or deep.shape[1:] != self.embeds.shape):
            raise ValueError(f"mm.deepstack must be [L, {rows.numel()}, {hidden}], got {list(deep.shape)}")
        return rows


@runtime_checkable
class LanguageModel(Protocol):
    """The decoder of one TP rank, as the engine drives it."""

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether a decode step may be captured in a CUDA graph."""
        ...

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by this rank (the paged cache's Hkv)."""
        ...

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Per decoder layer: "full_attention" (paged KV) or "linear_attention" (state slots)."""
        ...

    def state_shapes(self) -> StateShapes | None:
        """Per-slot state shapes of a linear-attention layer on this rank; None without such layers."""
        ...

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
        kv_caches: list[LayerCache] | None = None, mm: MultimodalBatch | None = None,
    ) -> torch.Tensor:
        """Shapes: input_ids [T] int64; positions [3, T] int64 -> hidden [T, H].

        `kv_caches[i]` is layer i's cache (see `LayerCache`); None runs each
        sequence from scratch without a cache (full-sequence parity tests).
        """
        ...

    def compute_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Shapes: hidden [N, H] -> logits [N, vocab] in `dtype` (None: the model's; full vocab on every rank)."""
        ...

    def load_weights(self, reader: CheckpointReader) -> list[str]:
        """Load this rank's slices of every parameter; returns the checkpoint keys read."""
        ...

    def eval(self) -> Any:
        ...
