"""Sizing and allocating the paged KV cache tensors of one rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.errors import KVCacheTooSmallError
from models.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from engine.runner import ModelRunner


def num_full_attention_layers(runner: ModelRunner) -> int:
    text = runner.model_config.text
    return sum(1 for i in range(text.num_hidden_layers) if text.layer_type(i) == "full_attention")


def block_bytes(runner: ModelRunner) -> int:
    """Bytes of one KV block over all full-attention layers (key + value)."""
    text = runner.model_config.text
    elem = torch.empty((), dtype=runner.dtype).element_size()
    per_layer = runner.config.block_size * runner.model.num_kv_heads * text.head_dim * elem
    return 2 * per_layer * num_full_attention_layers(runner)


def num_blocks_for(runner: ModelRunner, max_model_len: int) -> int:
    """`num_gpu_blocks` if given; else from CUDA memory after a profiling pass, or the CPU bound."""
    cfg = runner.config
    if cfg.num_gpu_blocks is not None:
        return cfg.num_gpu_blocks
    per_block = block_bytes(runner)
    if runner.device.type == "cuda":
        available = _profile_cuda(runner, max_model_len)
        blocks = int(available // per_block)
    else:
        blocks = int(cfg.cpu_kv_cache_gb * 2**30 // per_block)
        # More than every running sequence at full length is never used on CPU.
        blocks = min(blocks, cfg.max_num_seqs * -(-max_model_len // cfg.block_size) + 1)
    if blocks < 1:
        raise KVCacheTooSmallError(
            f"no memory left for the KV cache (one block is {per_block} bytes); lower "
            "max_num_batched_tokens or raise gpu_memory_utilization / cpu_kv_cache_gb"
        )
    return blocks


@torch.inference_mode()
def _profile_cuda(runner: ModelRunner, max_model_len: int) -> int:
    """Bytes left for KV blocks: util x total - what is in use - the activation peak."""
    cfg = runner.config
    tokens = cfg.max_num_batched_tokens
    lens = [max_model_len] * (tokens // max_model_len)
    if tokens % max_model_len:
        lens.append(tokens % max_model_len)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vocab = runner.model_config.text.vocab_size
    ids = torch.randint(0, vocab, (tokens,), device=runner.device)
    pos = torch.arange(tokens, device=runner.device).expand(3, -1).contiguous()
    attn = AttentionMetadata.packed(lens, device=runner.device)
    hidden = runner.model(ids, pos, attn, None, None)
    runner.model.compute_logits(hidden[: min(cfg.max_num_seqs, tokens)])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del hidden
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    available = int(total * cfg.gpu_memory_utilization - (total - free) - peak)
    if available <= 0:
        gib = 2**30
        raise KVCacheTooSmallError(
            f"no GPU memory left for the KV cache: {cfg.gpu_memory_utilization:.2f} x {total / gib:.1f} GiB "
            f"allowed, {(total - free) / gib:.1f} GiB in use on the device (this process: "
            f"{torch.cuda.memory_reserved() / gib:.1f} GiB reserved), activation peak {peak / gib:.2f} GiB; "
            "raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return available


def allocate_kv_caches(runner: ModelRunner, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed `[num_blocks, block_size, Hkv_per_rank, D]` key/value caches per full-attention layer.

    Zeroed, not empty: padded block-table entries may be read (and masked),
    and NaN garbage times a zero weight would still be NaN.
    """
    text = runner.model_config.text
    shape = (num_blocks, runner.config.block_size, runner.model.num_kv_heads, text.head_dim)
    return [
        (
            torch.zeros(shape, dtype=runner.dtype, device=runner.device),
            torch.zeros(shape, dtype=runner.dtype, device=runner.device),
        )
        for _ in range(num_full_attention_layers(runner))
    ]
