"""Rotary position embeddings: plain RoPE, (interleaved) mRoPE and the ViT's 2-D RoPE.

Each module owns the fp32 `cos_sin_cache [max_position, rotary_dim]` that
`ops.rotary_embedding` reads (first half cos, second half sin; column `i` is
frequency `i`) and applies it in place to q and k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import ops
from models.layers.layernorm import RMSNorm


def rope_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """HF default RoPE frequencies: `1 / base^(2i / rotary_dim)`, [rotary_dim / 2] fp32."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """Shapes: inv_freq [rot_dim / 2] -> cache [max_position, rot_dim] fp32 (cos | sin)."""
    # fp32 position * inv_freq, as transformers computes its angles.
    freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE over the first `rotary_dim` dims of each head (neox pairs by default).

    With `mrope_section`, positions are `[len(mrope_section), T]` and frequency
    `i` takes its position from the row the section layout assigns
    (docs/INTERNALS.md, `rotary_embedding`); otherwise positions are `[T]`.
    `inv_freq` overrides the default `rope_inv_freq(rotary_dim, base)`.
    """

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        base: float = 10000.0,
        is_neox: bool = True,
        mrope_section: Sequence[int] | None = None,
        mrope_interleaved: bool = False,
        inv_freq: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if rotary_dim % 2 or rotary_dim > head_size:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_size {head_size}")
        if mrope_section is not None and 2 * sum(mrope_section) != rotary_dim:
            raise ValueError(f"mrope_section {list(mrope_section)} must sum to rotary_dim/2 = {rotary_dim // 2}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.is_neox = is_neox
        self.mrope_section = list(mrope_section) if mrope_section is not None else None
        self.mrope_interleaved = mrope_interleaved
        if inv_freq is None:
            inv_freq = rope_inv_freq(rotary_dim, base)
        if inv_freq.shape != (rotary_dim // 2,):
            raise ValueError(f"inv_freq must be [{rotary_dim // 2}], got {list(inv_freq.shape)}")
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(inv_freq, max_position), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # `.to(device)` moves the cache; `.to(bf16)` must not round it: the op reads fp32.
        cache = self.cos_sin_cache
        module = super()._apply(fn, recurse)
        if self.cos_sin_cache.dtype != torch.float32:
            self.cos_sin_cache = cache.to(device=self.cos_sin_cache.device)
        return module

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """In place on query [T, Hq, D] / [T, Hq*D] and key (or None); returns them."""
        ops.rotary_embedding(
            self.op_positions(positions), query, key, self.head_size, self.cos_sin_cache, self.is_neox,
            self.mrope_section, self.mrope_interleaved,
        )
        return query, key

    def with_qk_norm(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`q_norm` / `k_norm` over each head, then this rotation: in place, one op (`ops.qk_norm_rope`).

        Shapes: query [T, Hq, D], key [T, Hkv, D] (views of a fused qkv output are fine).
        """
        if q_norm.eps != k_norm.eps:
            raise ValueError(f"q_norm eps {q_norm.eps} != k_norm eps {k_norm.eps}")
        ops.qk_norm_rope(
            self.op_positions(positions), query, key, q_norm.weight, k_norm.weight, q_norm.eps,
            self.cos_sin_cache, self.is_neox, self.mrope_section, self.mrope_interleaved,
        )
        return query, key

    def with_qk_norm_and_cache(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        q_norm: RMSNorm,
        k_norm: RMSNorm,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`with_qk_norm`, and the rotated key and `value` written at `slot_mapping` of
        `kv_cache` in the same launch (`ops.qk_norm_rope_and_cache`): the attention then reads
        the cache without writing it (`Attention.forward(..., kv_written=True)`). Without a
        cache (the prefix-free parity runs), `with_qk_norm` alone.

        Shapes: query [T, Hq, D], key / value [T, Hkv, D]; kv_cache two
        [num_blocks, block_size, Hkv, D]; slot_mapping [T] int64 (< 0: not cached).
        """
        if kv_cache is None:
            return self.with_qk_norm(positions, query, key, q_norm, k_norm)
        if q_norm.eps != k_norm.eps:
            raise ValueError(f"q_norm eps {q_norm.eps} != k_norm eps {k_norm.eps}")
        key_cache, value_cache = kv_cache
        ops.qk_norm_rope_and_cache(
            self.op_positions(positions), query, key, value, q_norm.weight, k_norm.weight, q_norm.eps,
            self.cos_sin_cache, key_cache, value_cache, slot_mapping, self.is_neox, self.mrope_section,
            self.mrope_interleaved,
        )
        return query, key

    def op_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The positions as the op reads them (`[T]`, or `[len(mrope_section), T]`)."""
        return positions

    def extra_repr(self) -> str:
        return (
            f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, max_position={self.max_position}, "
            f"mrope_section={self.mrope_section}, interleaved={self.mrope_interleaved}"
        )


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen3-VL multimodal RoPE: positions `[3, T]` (t, h, w); `[T]` means text (all rows equal)."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        mrope_section: Sequence[int],
        interleaved: bool = True,
    ) -> None:
        super().__init__(
            head_size, rotary_dim, max_position, base, True, mrope_section, interleaved
        )

    def op_positions(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.dim() == 1:
            return positions.unsqueeze(0).expand(len(self.mrope_section), -1)
        return positions


def vision_rotary_embedding(
    head_dim: int, max_position: int, base: float = 10000.0
) -> RotaryEmbedding:
    """The Qwen3-VL ViT's axial 2-D RoPE over the whole head (neox).

    Call it with `positions [2, T]`: row 0 the patch's row (h) coordinate, row
    1 its column (w) coordinate. Frequencies: `head_dim / 4` from h, then the
    same `head_dim / 4` frequencies from w (transformers'
    `Qwen3VLVisionRotaryEmbedding`). `max_position` bounds the grid side in
    patches.
    """
    if head_dim % 4:
        raise ValueError(f"vision head_dim {head_dim} must be a multiple of 4")
    quarter = head_dim // 4
    inv = rope_inv_freq(head_dim // 2, base)  # [head_dim / 4]
    return RotaryEmbedding(
        head_dim, head_dim, max_position, base, is_neox=True,
        mrope_section=[quarter, quarter], mrope_interleaved=False, inv_freq=torch.cat([inv, inv]),
    )
