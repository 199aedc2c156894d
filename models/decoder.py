"""What the Qwen3 and Qwen3.5 decoders share: the embed -> layers -> norm stack with
image embeddings and deepstack injection, the MLP choice per layer, and the
causal-LM wrapper (LM head, weight loading). Each model file adds its layers and
its answers to `models.interface.LanguageModel`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from models.config import ModelConfig, TextConfig
from models.interface import LayerCache, MultimodalBatch
from models.layers.attention import AttentionMetadata
from models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from models.layers.mlp import SwiGLUMLP
from models.layers.moe import PendingCombine, SparseMoeBlock, materialize
from models.layers.parallel import SINGLE, ParallelContext
from models.layers.rotary import MRotaryEmbedding, RotaryEmbedding
from models.loader import CheckpointReader, load_language_model

@contextmanager
def default_dtype_and_device(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Create parameters directly in `dtype` on `device` (restores the old default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_rotary(text: TextConfig) -> RotaryEmbedding:
    """Interleaved/chunked mRoPE when the config has `mrope_section`, else plain RoPE."""
    if text.mrope_section is not None:
        return MRotaryEmbedding(
            text.head_dim, text.rotary_dim, text.max_position_embeddings, text.rope_theta,
            text.mrope_section, text.mrope_interleaved,
        )
    return RotaryEmbedding(text.head_dim, text.rotary_dim, text.max_position_embeddings, text.rope_theta)


def build_mlp(text: TextConfig, layer_idx: int, parallel: ParallelContext) -> nn.Module:
    """The sparse MoE block on MoE layers (HF's rule), else the dense SwiGLU MLP."""
    if text.is_moe_layer(layer_idx):
        return SparseMoeBlock(
            text.hidden_size, text.moe_intermediate_size, text.num_experts, text.num_experts_per_tok,
            text.norm_topk_prob, parallel, text.shared_expert_intermediate_size,
        )
    if text.hidden_act != "silu":
        raise ValueError(f"unsupported hidden_act {text.hidden_act!r} (only 'silu')")
    return SwiGLUMLP(text.hidden_size, text.intermediate_size, parallel)


class DecoderLayer(nn.Module):
    """Pre-norm block: `input_layernorm` -> token mixer (`mix`) -> `post_attention_layernorm` -> `mlp`.

    The residual stream is carried unnormalized beside the block output and
    added inside the next fused add + norm. Subclasses set `norm_class` (also
    the decoder's final norm) and define `build_mixer` and `mix`.
    """

    norm_class: type[nn.Module]

    def __init__(self, text: TextConfig, layer_idx: int, rotary: RotaryEmbedding, parallel: ParallelContext) -> None:
        super().__init__()
        self.build_mixer(text, layer_idx, rotary, parallel)
        self.mlp = build_mlp(text, layer_idx, parallel)
        self.input_layernorm = self.norm_class(text.hidden_size, text.rms_norm_eps)
        self.post_attention_layernorm = self.norm_class(text.hidden_size, text.rms_norm_eps)

    def build_mixer(self, text: TextConfig, layer_idx: int, rotary: RotaryEmbedding, parallel: ParallelContext) -> None:
        """Create layer `layer_idx`'s token mixer (its checkpoint name: `self_attn` or `linear_attn`)."""
        raise NotImplementedError

    def mix(
        self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, cache: LayerCache | None
    ) -> torch.Tensor:
        """The token mixer (attention of either kind). Shapes: x [T, H] normalized -> [T, H]."""
        raise NotImplementedError

    def mix_prenorm(
        self, x: torch.Tensor | PendingCombine, residual: torch.Tensor, positions: torch.Tensor,
        attn: AttentionMetadata, cache: LayerCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`mix` of `input_layernorm(x, residual)`, and the new residual. A mixer that starts with a
        column-parallel projection may fold the add + norm into it (`ColumnParallelLinear.norm_forward`).
        Shapes: x [T, H] un-normalized (or a pending combine), residual [T, H] -> ([T, H], [T, H])."""
        x, residual = self.input_layernorm(x, residual)
        return self.mix(x, positions, attn, cache), residual

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
        attn: AttentionMetadata, cache: LayerCache | None,
    ) -> tuple[torch.Tensor | PendingCombine, torch.Tensor]:
        """Shapes: x [T, H] (or the previous MoE block's pending combine) -> (block output [T, H]
        or pending combine, residual [T, H]); the layer's output is their sum."""
        if residual is None:
            residual = x
            x = self.mix(self.input_layernorm(x), positions, attn, cache)
        else:
            x, residual = self.mix_prenorm(x, residual, positions, attn, cache)
        if isinstance(self.mlp, SparseMoeBlock) and self.mlp.takes_block(x):
            return self.mlp.forward_block(x, residual, self.post_attention_layernorm)  # norm + block, one op
        x, residual = self.post_attention_layernorm(x, residual)
        if isinstance(self.mlp, SparseMoeBlock):
            return self.mlp.forward_deferred(x), residual  # the next norm may take the combine
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """`embed_tokens`, `layers`, `norm` (the checkpoint's `model.*`), one rotary module shared by the layers.

    `layer_class(text, layer_idx, rotary, parallel)` builds layer i; its `norm_class` the final norm.
    """

    def __init__(self, text: TextConfig, parallel: ParallelContext, layer_class: type[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size, parallel)
        self.rotary_emb = build_rotary(text)
        self.layers = nn.ModuleList(
            [layer_class(text, i, self.rotary_emb, parallel) for i in range(text.num_hidden_layers)]
        )
        self.norm = layer_class.norm_class(text.hidden_size, text.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
        caches: list[LayerCache] | None, mm: MultimodalBatch | None,
    ) -> torch.Tensor:
        """Embed (image rows from `mm.embeds`), run every layer, add deepstack, final norm.

        Shapes: input_ids [T] int64 -> hidden [T, H].
        """
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"got {len(caches)} layer caches for {len(self.layers)} layers")
        x = self.embed_tokens(input_ids)
        # The image rows are found once per step (one host sync), not once per use.
        rows = mm.rows(input_ids.shape[0], self.embed_tokens.embedding_dim) if mm is not None else None
        if mm is not None:
            x.index_copy_(0, rows, mm.embeds.to(x.dtype))
        deepstack = mm.deepstack if mm is not None else None
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, attn, None if caches is None else caches[i])
            if deepstack is not None and i < deepstack.shape[0]:
                # Added to the layer output (x + residual) at the image rows.
                x = materialize(x)
                x.index_add_(0, rows, deepstack[i].to(x.dtype))
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """A decoder of one TP rank with its LM head: `forward` -> hidden, `compute_logits` -> logits (fp32 by default).

    Subclasses set the decoder's `layer_class` and check that `config` is theirs.
    """

    layer_class: type[DecoderLayer]

    def __init__(
        self, config: ModelConfig, parallel: ParallelContext | None = None,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        text = config.text
        self._check_architecture(config)
        self.config = config
        self.parallel = parallel or SINGLE
        with default_dtype_and_device(dtype, device):
            self.model = DecoderModel(text, self.parallel, self.layer_class)
            self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, self.parallel)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _check_architecture(config: ModelConfig) -> None:
        raise NotImplementedError

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether a decode step may be captured: every layer's forward is free of host syncs,
        which only a sparse MoE block can break (its `capturable`)."""
        return all(layer.mlp.capturable for layer in self.model.layers if isinstance(layer.mlp, SparseMoeBlock))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[LayerCache] | None = None,
        mm: MultimodalBatch | None = None,
    ) -> torch.Tensor:
        """Shapes: input_ids [T] int64; positions [3, T] or [T] int64 -> hidden [T, H].

        `kv_caches[i]` is layer i's cache (`models.interface.LayerCache`); None
        runs each sequence from scratch without a cache.
        """
        if self.config.text.mrope_section is None and positions.dim() == 2:
            positions = positions[0]
        return self.model(input_ids, positions, attn, kv_caches, mm)

    def compute_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Shapes: hidden [N, H] -> logits [N, vocab] in `dtype` (None: the model's; full vocab on every rank)."""
        return self.lm_head.compute_logits(hidden, dtype)

    @torch.no_grad()
    def load_weights(self, reader: CheckpointReader) -> list[str]:
        """Load this rank's slices of every parameter; returns the checkpoint keys read."""
        return load_language_model(self, reader)
