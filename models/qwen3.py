"""Qwen3 / Qwen3-MoE decoder (the language model of Qwen3-VL and Qwen3-VL-MoE).

Module names follow the HF checkpoints (`model.layers.{i}.self_attn.*`, ...),
with q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj`. Serves
`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`
(language part) and the text-only `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig, TextConfig
from models.decoder import CausalLM, DecoderLayer
from models.interface import LayerCache, StateShapes
from models.layers.attention import Attention, AttentionMetadata
from models.layers.layernorm import RMSNorm
from models.layers.linear import QKVParallelLinear, RowParallelLinear
from models.layers.moe import PendingCombine
from models.layers.parallel import ParallelContext
from models.layers.rotary import RotaryEmbedding


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
        self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, kv_cache: LayerCache | None
    ) -> torch.Tensor:
        return self.forward_qkv(self.qkv_proj(x), positions, attn, kv_cache)

    def forward_qkv(
        self, qkv: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, kv_cache: LayerCache | None
    ) -> torch.Tensor:
        """`forward` after the qkv projection. Shapes: qkv [T, (Hq + 2 Hkv) D per rank] -> [T, H]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))  # strided view: the ops read rows by stride
        # In place on qkv; k, v into the cache (if any) in the same launch: one less per layer at decode.
        self.rotary_emb.with_qk_norm_and_cache(
            positions, q, k, v, self.q_norm, self.k_norm, kv_cache, attn.slot_mapping
        )
        out = self.attn(q, k, v, attn, kv_cache, kv_written=kv_cache is not None)
        return self.o_proj(out.flatten(1))


class Qwen3DecoderLayer(DecoderLayer):
    norm_class = RMSNorm

    def build_mixer(self, text: TextConfig, layer_idx: int, rotary: RotaryEmbedding, parallel: ParallelContext) -> None:
        self.self_attn = Qwen3Attention(text, rotary, parallel)

    def mix(
        self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, cache: LayerCache | None
    ) -> torch.Tensor:
        return self.self_attn(x, positions, attn, cache)

    def mix_prenorm(
        self, x: torch.Tensor | PendingCombine, residual: torch.Tensor, positions: torch.Tensor,
        attn: AttentionMetadata, cache: LayerCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self.self_attn.qkv_proj.norm_forward(x, residual, self.input_layernorm)
        return self.self_attn.forward_qkv(qkv, positions, attn, cache), residual


class Qwen3ForCausalLM(CausalLM):
    """The Qwen3 / Qwen3-MoE decoder of one TP rank (`models.interface.LanguageModel`).

    `kv_caches[i]` in `forward`: layer i's paged `(key_cache, value_cache)`, each
    `[num_blocks, block_size, Hkv_per_rank, D]`.
    """

    layer_class = Qwen3DecoderLayer

    @staticmethod
    def _check_architecture(config: ModelConfig) -> None:
        if config.text.is_hybrid or config.text.attn_output_gate:
            raise ValueError(f"{config.architecture} is a hybrid Qwen3.5 decoder; use models.qwen3_5")

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by this rank (the cache's Hkv)."""
        return self.model.layers[0].self_attn.num_kv_heads

    @property
    def layer_types(self) -> tuple[str, ...]:
        return ("full_attention",) * len(self.model.layers)

    def state_shapes(self) -> StateShapes | None:
        """None: every layer is full attention (no state slots)."""
        return None
