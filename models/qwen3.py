"""Qwen3 / Qwen3-MoE decoder (the language model of Qwen3-VL and Qwen3-VL-MoE).

Module names follow the HF checkpoints (`model.layers.{i}.self_attn.*`, ...),
with q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj`. Serves
`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`
(language part) and the text-only `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

import ops
from models.config import ModelConfig, TextConfig
from models.layers.attention import Attention, AttentionMetadata
from models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from models.layers.layernorm import RMSNorm
from models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from models.layers.moe import SparseMoeBlock
from models.layers.parallel import SINGLE, ParallelContext
from models.layers.rotary import MRotaryEmbedding, RotaryEmbedding
from models.loader import CheckpointReader, load_language_model

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class MultimodalBatch:
    """Vision inputs of one step, aligned with its tokens.

    Shapes: embeds [N, H] (one row per True in `mask`, in order);
    deepstack [L, N, H] or None; mask [T] bool over the step's tokens.
    """

    embeds: torch.Tensor
    deepstack: torch.Tensor | None
    mask: torch.Tensor


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


class Qwen3Attention(nn.Module):
    """GQA with per-head q/k RMSNorm and (m)RoPE. Shapes: x [T, H] -> [T, H]."""

    def __init__(self, text: TextConfig, rotary: RotaryEmbedding, parallel: ParallelContext) -> None:
        super().__init__()
        self.head_dim = text.head_dim
        self.qkv_proj = QKVParallelLinear(
            text.hidden_size, text.head_dim, text.num_attention_heads, text.num_key_value_heads,
            bias=text.attention_bias, parallel=parallel,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            text.num_attention_heads * text.head_dim, text.hidden_size, bias=text.attention_bias, parallel=parallel,
        )
        self.q_norm = RMSNorm(text.head_dim, text.rms_norm_eps)
        self.k_norm = RMSNorm(text.head_dim, text.rms_norm_eps)
        self.rotary_emb = rotary  # one module shared by every layer (it holds no parameters)
        self.attn = Attention(self.num_heads, self.num_kv_heads, text.head_dim, text.head_dim**-0.5)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, kv_cache: KVCache | None
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim)))
        k = self.k_norm(k.unflatten(-1, (self.num_kv_heads, self.head_dim)))
        self.rotary_emb(positions, q, k)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim)).contiguous()
        out = self.attn(q, k, v, attn, kv_cache)
        return self.o_proj(out.flatten(1))


class Qwen3MLP(nn.Module):
    """SwiGLU MLP. Shapes: x [T, H] -> [T, H]."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, parallel: ParallelContext) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r} (only 'silu')")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, parallel=parallel)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, parallel=parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, text: TextConfig, layer_idx: int, rotary: RotaryEmbedding, parallel: ParallelContext) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(text, rotary, parallel)
        if text.is_moe_layer(layer_idx):
            self.mlp: nn.Module = SparseMoeBlock(
                text.hidden_size, text.moe_intermediate_size, text.num_experts, text.num_experts_per_tok,
                text.norm_topk_prob, parallel, text.shared_expert_intermediate_size,
            )
        else:
            self.mlp = Qwen3MLP(text.hidden_size, text.intermediate_size, text.hidden_act, parallel)
        self.input_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
        attn: AttentionMetadata, kv_cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, residual); the layer's output is their sum."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, attn, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen3Model(nn.Module):
    def __init__(self, text: TextConfig, parallel: ParallelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size, parallel)
        rotary = build_rotary(text)
        self.rotary_emb = rotary
        self.layers = nn.ModuleList(
            [Qwen3DecoderLayer(text, i, rotary, parallel) for i in range(text.num_hidden_layers)]
        )
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor, mm: MultimodalBatch | None, image_rows: torch.Tensor | None) -> torch.Tensor:
        return embed_with_images(self.embed_tokens, input_ids, mm, image_rows)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
        kv_caches: list[KVCache] | None, mm: MultimodalBatch | None,
    ) -> torch.Tensor:
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} kv caches for {len(self.layers)} layers")
        # The image rows are found once per step (one host sync), not once per use.
        image_rows = _image_rows(mm, input_ids.shape[0], self.embed_tokens.embedding_dim) if mm is not None else None
        x, residual = self.embed(input_ids, mm, image_rows), None
        deepstack = mm.deepstack if mm is not None else None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, attn, None if kv_caches is None else kv_caches[i])
            if deepstack is not None and i < deepstack.shape[0]:
                # Added to the layer output (x + residual) at the image rows.
                x.index_add_(0, image_rows, deepstack[i].to(x.dtype))
        x, _ = self.norm(x, residual)
        return x


def embed_with_images(
    embed_tokens: nn.Module, input_ids: torch.Tensor, mm: MultimodalBatch | None, image_rows: torch.Tensor | None
) -> torch.Tensor:
    """Token embeddings with the image rows replaced by the vision tower's embeddings."""
    x = embed_tokens(input_ids)
    if mm is not None:
        x.index_copy_(0, image_rows, mm.embeds.to(x.dtype))
    return x


def _image_rows(mm: MultimodalBatch, num_tokens: int, hidden: int) -> torch.Tensor:
    """Indices of the masked (image) tokens, after checking the batch's shapes."""
    if mm.mask.shape != (num_tokens,) or mm.mask.dtype != torch.bool:
        raise ValueError(f"mm.mask must be bool [{num_tokens}], got {mm.mask.dtype} {list(mm.mask.shape)}")
    rows = mm.mask.nonzero().squeeze(1)
    if mm.embeds.shape != (rows.numel(), hidden):
        raise ValueError(f"mm.embeds must be [{rows.numel()}, {hidden}] (one row per masked token), "
                         f"got {list(mm.embeds.shape)}")
    if mm.deepstack is not None and (mm.deepstack.dim() != 3 or mm.deepstack.shape[1:] != mm.embeds.shape):
        raise ValueError(f"mm.deepstack must be [L, {rows.numel()}, {hidden}], got {list(mm.deepstack.shape)}")
    return rows


class Qwen3ForCausalLM(nn.Module):
    """The decoder of one TP rank: `forward` -> hidden, `compute_logits` -> fp32 full-vocab logits."""

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
            self.model = self.model_class(text, self.parallel)
            self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, self.parallel)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    model_class: type[nn.Module] = Qwen3Model

    @staticmethod
    def _check_architecture(config: ModelConfig) -> None:
        if config.text.is_hybrid or config.text.attn_output_gate:
            raise ValueError(f"{config.architecture} is a hybrid Qwen3.5 decoder; use models.qwen3_5")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
        mm: MultimodalBatch | None = None,
    ) -> torch.Tensor:
        """Shapes: input_ids [T] int64; positions [3, T] or [T] int64 -> hidden [T, H].

        `kv_caches[i]` is layer i's `(key_cache, value_cache)`, each
        `[num_blocks, block_size, Hkv_per_rank, D]`; None runs without a cache.
        """
        if self.config.text.mrope_section is None and positions.dim() == 2:
            positions = positions[0]
        return self.model(input_ids, positions, attn, kv_caches, mm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shapes: hidden [N, H] -> logits [N, vocab] fp32 (full vocab on every rank)."""
        return self.lm_head.compute_logits(hidden)

    @torch.no_grad()
    def load_weights(self, reader: CheckpointReader) -> list[str]:
        """Load this rank's slices of every parameter; returns the checkpoint keys read."""
        return load_language_model(self, reader)

    @property
    def supports_cuda_graphs(self) -> bool:
        """MoE routing reads expert token counts on the host, which a CUDA graph cannot capture."""
        return not self.config.text.is_moe

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by this rank (the cache's Hkv)."""
        return self.model.layers[0].self_attn.num_kv_heads
