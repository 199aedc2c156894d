"""Attention over packed sequences, with or without the paged KV cache.

`AttentionMetadata` is built by the engine (docs/INTERNALS.md) once per step
and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import ops


@dataclass(frozen=True, slots=True)
class PromptPart:
    """A mixed step's prompt chunks, after its leading decode rows (`AttentionMetadata.prompt_part`).

    The step's first `num_decodes` sequences have one query each and run the paged decode
    kernel (its CTAs share each KV head's keys across the head's query group and split long
    contexts); the sequences after them run `ops.varlen_attention` over this layout. Without
    the split a decode row would take a varlen CTA of its own per query head, each reading the
    row's whole context: Hq / Hkv times the decode kernel's KV bytes, one CTA streaming it.

    Fields (views and layouts made once per step, read by every layer): decode_block_tables /
    decode_seq_lens, the step's rows of the N decode sequences; block_tables, those of the P
    prompt sequences; cu_seqlens_q / cu_seqlens_k [P+1] int32 of the prompt sequences, from 0;
    max_seqlen_q / max_seqlen_k their maxima.
    """

    num_decodes: int
    decode_block_tables: torch.Tensor
    decode_seq_lens: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """One step's batch layout.

    Fields:
        cu_seqlens_q: [B+1] int32, new (query) tokens per sequence, prefix-summed.
        cu_seqlens_k: [B+1] int32, context length per sequence incl. the new tokens.
        max_seqlen_q / max_seqlen_k: maxima of the above lengths.
        slot_mapping: [T] int64, cache slot of each new token (< 0: not cached).
        block_tables: [B, max_blocks] int32 or None (no paged context: keys are
            the packed new tokens, so cu_seqlens_k must equal cu_seqlens_q).
        seq_lens: [B] int32, context length per sequence (for decode).
        decode_only: every sequence has exactly one query -> paged decode kernel.
        state_indices: [B] int32 or None, each sequence's state slot in the
            linear-attention (Gated DeltaNet) state pools of hybrid models.
        has_initial_state: [B] bool, whether sequence b continues the state in
            its slot (a later prefill chunk) rather than starting from zeros;
            None: every sequence continues its slot. The engine passes None
            whenever that holds (every decode step), so hybrid models pick the
            single-token kernels from host facts, never by reading the tensor.
        prompt_part: a mixed step (decode rows first, then prompt chunks) split in two
            attention calls, or None (one call for the whole step).
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor | None
    seq_lens: torch.Tensor
    decode_only: bool = False
    state_indices: torch.Tensor | None = None
    has_initial_state: torch.Tensor | None = None
    prompt_part: PromptPart | None = None

    @classmethod
    def packed(cls, seq_lens: Sequence[int], device: torch.device | str = "cpu") -> AttentionMetadata:
        """Full sequences, no cache (parity tests, the ViT): keys are the packed queries."""
        lens = torch.tensor(list(seq_lens), dtype=torch.int32, device=device)
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        longest = max(seq_lens, default=0)
        total = int(sum(seq_lens))
        no_slots = torch.full((total,), -1, dtype=torch.int64, device=device)
        return cls(cu, cu, longest, longest, no_slots, None, lens, False)


class Attention(nn.Module):
    """Scaled dot-product attention of already-projected, already-rotated q/k/v.

    Shapes: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]. GQA by Hq // Hkv.
    With `kv_cache = (key_cache, value_cache)` (`[num_blocks, block_size, Hkv, D]`),
    the new k/v are written at `slot_mapping` first (unless `kv_written`: the
    caller's `ops.qk_norm_rope_and_cache` already wrote them), then decode runs
    `ops.paged_attention_decode`, prefill `ops.varlen_attention` over the paged
    context (cached prefix + new tokens). Without a cache, k/v are the packed
    keys. `causal=False` gives the ViT's bidirectional attention per sequence.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, causal: bool = True) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.causal = causal

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_written: bool = False,
    ) -> torch.Tensor:
        if kv_cache is None:
            return self._packed(q, k, v, attn)
        key_cache, value_cache = kv_cache
        if not kv_written:
            ops.reshape_and_cache(k, v, key_cache, value_cache, attn.slot_mapping)
        if attn.block_tables is None:
            return self._packed(q, k, v, attn)
        if attn.decode_only:
            return ops.paged_attention_decode(
                q, key_cache, value_cache, attn.block_tables, attn.seq_lens, self.scale
            )
        if attn.prompt_part is not None and self.causal:
            return self._split(q, key_cache, value_cache, attn.prompt_part)
        return ops.varlen_attention(
            q, None, None, attn.cu_seqlens_q, attn.cu_seqlens_k, attn.max_seqlen_q,
            attn.max_seqlen_k, self.scale, self.causal, key_cache, value_cache, attn.block_tables,
        )

    def _split(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, part: PromptPart
    ) -> torch.Tensor:
        """A mixed step as the paged decode kernel over its leading decode rows + varlen over the rest."""
        n = part.num_decodes
        decoded = ops.paged_attention_decode(
            q[:n], key_cache, value_cache, part.decode_block_tables, part.decode_seq_lens, self.scale
        )
        prompts = ops.varlen_attention(
            q[n:], None, None, part.cu_seqlens_q, part.cu_seqlens_k, part.max_seqlen_q, part.max_seqlen_k,
            self.scale, self.causal, key_cache, value_cache, part.block_tables,
        )
        return torch.cat((decoded, prompts))

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        return ops.varlen_attention(
            q, k, v, attn.cu_seqlens_q, attn.cu_seqlens_k, attn.max_seqlen_q,
            attn.max_seqlen_k, self.scale, self.causal,
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"causal={self.causal}"
        )
