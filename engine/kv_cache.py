"""The KV cache of one rank: its layout, how many blocks fit, and the tensors.

Hybrid (Qwen3.5) models also get, per linear-attention layer, fixed state pools
of `max_num_seqs` slots: conv state (model dtype) and recurrent state (fp32),
sized by the model's `state_shapes()`; their bytes come off the KV budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.errors import KVCacheTooSmallError
from models.layers.attention import AttentionMetadata

LayerCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Per-rank shapes of every layer's cache.

    full_attention[i]: layer i keeps paged KV blocks (else linear-attention state slots).
    conv_state / recurrent_state: one slot's state shapes (`()` when no layer needs them).
    """

    full_attention: tuple[bool, ...]
    block_size: int
    num_kv_heads: int  # on this rank
    head_dim: int
    max_num_seqs: int  # state slots per linear-attention layer
    conv_state: tuple[int, ...]
    recurrent_state: tuple[int, ...]
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block over all full-attention layers (key + value)."""
        per_layer = self.block_size * self.num_kv_heads * self.head_dim * _elem(self.dtype)
        return 2 * per_layer * sum(self.full_attention)

    @property
    def state_bytes(self) -> int:
        """Bytes of every linear-attention layer's state pools (0 for non-hybrid models)."""
        layers = len(self.full_attention) - sum(self.full_attention)
        if layers == 0:
            return 0
        per_slot = math.prod(self.conv_state) * _elem(self.dtype) + math.prod(self.recurrent_state) * 4
        return layers * self.max_num_seqs * per_slot

    def num_blocks(self, budget_bytes: float, cap: int | None = None) -> int:
        """Blocks that fit in `budget_bytes` beside the state pools (at most `cap`).

        Raises:
            KVCacheTooSmallError: not even one block fits.
        """
        blocks = int((budget_bytes - self.state_bytes) // self.block_bytes)
        if cap is not None:
            blocks = min(blocks, cap)
        if blocks < 1:
            states = self.state_bytes
            hint = f", after {states / 2**30:.2f} GiB of linear-attention state for max_num_seqs slots" if states else ""
            raise KVCacheTooSmallError(
                f"no memory left for the KV cache (one block is {self.block_bytes} bytes{hint}); lower "
                "max_num_batched_tokens or max_num_seqs, or raise gpu_memory_utilization / cpu_kv_cache_gb"
            )
        return blocks

    def allocate(self, num_blocks: int, device: torch.device) -> list[LayerCache]:
        """One cache pair per decoder layer, zeroed.

        Full-attention layer: `[num_blocks, block_size, Hkv_per_rank, D]` key/value
        caches. Linear-attention layer: `[max_num_seqs, *conv]` conv state (model
        dtype) and `[max_num_seqs, *recurrent]` fp32 recurrent state.
        Zeroed, not empty: padded block-table entries may be read (and masked),
        and NaN garbage times a zero weight would still be NaN.
        """
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        slots = self.max_num_seqs
        caches = []
        for full in self.full_attention:
            if full:
                caches.append((torch.zeros(shape, dtype=self.dtype, device=device),
                               torch.zeros(shape, dtype=self.dtype, device=device)))
            else:
                caches.append((torch.zeros((slots, *self.conv_state), dtype=self.dtype, device=device),
                               torch.zeros((slots, *self.recurrent_state), dtype=torch.float32, device=device)))
        return caches


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@torch.inference_mode()
def cuda_kv_budget(
    forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    *, vocab_size: int, num_tokens: int, max_model_len: int, logit_rows: int, utilization: float,
    device: torch.device,
) -> int:
    """Bytes left for the KV cache: utilization x total - what is in use - the activation peak.

    The peak is measured by one cache-less forward over `num_tokens` tokens (the
    step budget) and the LM head over `logit_rows` of them.
    """
    lens = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        lens.append(num_tokens % max_model_len)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ids = torch.randint(0, vocab_size, (num_tokens,), device=device)
    pos = torch.arange(num_tokens, device=device).expand(3, -1).contiguous()
    attn = AttentionMetadata.packed(lens, device=device)
    hidden = forward(ids, pos, attn)
    compute_logits(hidden[: min(logit_rows, num_tokens)])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del hidden
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    available = int(total * utilization - (total - free) - peak)
    if available <= 0:
        gib = 2**30
        raise KVCacheTooSmallError(
            f"no GPU memory left for the KV cache: {utilization:.2f} x {total / gib:.1f} GiB "
            f"allowed, {(total - free) / gib:.1f} GiB in use on the device (this process: "
            f"{torch.cuda.memory_reserved() / gib:.1f} GiB reserved), activation peak {peak / gib:.2f} GiB; "
            "raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return available
