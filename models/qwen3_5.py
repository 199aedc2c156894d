"""Qwen3.5 / Qwen3.5-MoE hybrid decoder: the language model of
`Qwen3_5ForConditionalGeneration` and `Qwen3_5MoeForConditionalGeneration`.

Same math as transformers' `modeling_qwen3_5.py` / `modeling_qwen3_5_moe.py`:
`layer_types` picks, per layer, Gated DeltaNet linear attention
(`linear_attn.*`, models/layers/gated_delta_net.py) or gated full attention
(`self_attn.*`: q_proj emits each head's query and its output gate, q/k
RMSNorm, partial interleaved mRoPE, `o_proj(attn * sigmoid(gate))`); then a
SwiGLU MLP, or the sparse MoE block with a sigmoid-gated shared expert. Every
RMSNorm except the gated one scales by `1 + weight` (`OffsetRMSNorm`).

Caches: `kv_caches[i]` is layer i's `(key_cache, value_cache)` for a
full-attention layer and its `(conv_state, recurrent_state)` pools for a
linear-attention layer (`state_shapes()` gives their per-slot shapes);
`AttentionMetadata.state_indices` / `has_initial_state` address the slots
(`has_initial_state=None`: every sequence continues its slot).
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from models.config import ModelConfig, TextConfig
from models.decoder import CausalLM, DecoderLayer
from models.interface import LayerCache, StateShapes
from models.layers.attention import Attention, AttentionMetadata
from models.layers.gated_delta_net import GatedDeltaNet
from models.layers.layernorm import OffsetRMSNorm
from models.layers.linear import QKVParallelLinear, RowParallelLinear
from models.layers.moe import PendingCombine
from models.layers.parallel import ParallelContext
from models.layers.rotary import RotaryEmbedding


class Qwen3_5Attention(nn.Module):
    """GQA with an output gate, per-head (1 + w) q/k RMSNorm and partial mRoPE.

    `q_proj` is `[heads * 2 * D, H]`, each head's D query rows followed by its
    D gate rows, so it is fused as a QKV projection of `2 * heads` "heads" of
    size D and split per rank on whole (query, gate) pairs.
    Shapes: x [T, H] -> [T, H].
    """

    def __init__(self, text: TextConfig, rotary: RotaryEmbedding, parallel: ParallelContext) -> None:
        super().__init__()
        d = self.head_dim = text.head_dim
        self.qkv_proj = QKVParallelLinear(
            text.hidden_size, d, 2 * text.num_attention_heads, text.num_key_value_heads,
            bias=text.attention_bias, parallel=parallel,
        )
        self.num_heads = self.qkv_proj.num_heads // 2
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            text.num_attention_heads * d, text.hidden_size, bias=text.attention_bias, parallel=parallel,
        )
        self.q_norm = OffsetRMSNorm(d, text.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(d, text.rms_norm_eps)
        self.rotary_emb = rotary  # shared by every layer (no parameters)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, d**-0.5)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, kv_cache: LayerCache | None
    ) -> torch.Tensor:
        return self.forward_qkv(self.qkv_proj(x), positions, attn, kv_cache)

    def forward_qkv(
        self, qkv: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, kv_cache: LayerCache | None
    ) -> torch.Tensor:
        """`forward` after the q(+gate)/k/v projection. Shapes: qkv [T, (2 Hq + 2 Hkv) D per rank] -> [T, H]."""
        d, tokens = self.head_dim, qkv.shape[0]
        q_gate, k, v = qkv.split([2 * self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q_gate = q_gate.view(tokens, self.num_heads, 2 * d)
        gate = q_gate[..., d:]  # a strided view, read in place by the gate op
        q, k = q_gate[..., :d], k.unflatten(-1, (self.num_kv_heads, d))
        v = v.unflatten(-1, (self.num_kv_heads, d))  # strided view: the ops read rows by stride
        # In place on qkv; k, v into the cache (if any) in the same launch: one less per layer at decode.
        self.rotary_emb.with_qk_norm_and_cache(
            positions, q, k, v, self.q_norm, self.k_norm, kv_cache, attn.slot_mapping
        )
        out = self.attn(q, k, v, attn, kv_cache, kv_written=kv_cache is not None)
        return self.o_proj(ops.sigmoid_gate_mul(out, gate).flatten(1))


class Qwen3_5DecoderLayer(DecoderLayer):
    norm_class = OffsetRMSNorm

    def build_mixer(self, text: TextConfig, layer_idx: int, rotary: RotaryEmbedding, parallel: ParallelContext) -> None:
        self.layer_type = text.layer_type(layer_idx)
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(
                text.hidden_size, text.linear_num_key_heads, text.linear_num_value_heads,
                text.linear_key_head_dim, text.linear_value_head_dim, text.linear_conv_kernel_dim,
                text.rms_norm_eps, parallel,
            )
        else:
            self.self_attn = Qwen3_5Attention(text, rotary, parallel)

    def mix(
        self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, cache: LayerCache | None
    ) -> torch.Tensor:
        if self.layer_type == "linear_attention":
            return self.linear_attn(x, attn, cache)
        return self.self_attn(x, positions, attn, cache)

    def mix_prenorm(
        self, x: torch.Tensor | PendingCombine, residual: torch.Tensor, positions: torch.Tensor,
        attn: AttentionMetadata, cache: LayerCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full attention folds its (1 + w) input norm into the qkv projection as Qwen3's layers do
        (the op takes the fp32 weight with `ops.fused_add_rms_norm`'s rounding)."""
        if self.layer_type == "linear_attention":
            return super().mix_prenorm(x, residual, positions, attn, cache)
        qkv, residual = self.self_attn.qkv_proj.norm_forward(x, residual, self.input_layernorm)
        return self.self_attn.forward_qkv(qkv, positions, attn, cache), residual


class Qwen3_5ForCausalLM(CausalLM):
    """The hybrid decoder of one TP rank (`models.interface.LanguageModel`).

    `kv_caches[i]` in `forward`: layer i's paged `(key_cache, value_cache)` (full
    attention) or `(conv_state, recurrent_state)` pools (linear attention), with
    `attn.state_indices` set; None runs each sequence from scratch without any cache.
    """

    layer_class = Qwen3_5DecoderLayer

    @staticmethod
    def _check_architecture(config: ModelConfig) -> None:
        if config.text.layer_types is None or not config.text.attn_output_gate:
            raise ValueError(f"{config.architecture} is not a Qwen3.5 hybrid decoder; use models.qwen3")

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by this rank (the paged cache's Hkv)."""
        return next(layer.self_attn.num_kv_heads for layer in self.model.layers
                    if layer.layer_type == "full_attention")

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(layer.layer_type for layer in self.model.layers)

    def state_shapes(self) -> StateShapes | None:
        """Per-slot (conv state, recurrent state) shapes of a linear-attention layer on this rank."""
        return next(layer.linear_attn.state_shapes() for layer in self.model.layers
                    if layer.layer_type == "linear_attention")
