"""Sizing and allocating the paged KV cache tensors of one rank.

Hybrid (Qwen3.5) models also get, per linear-attention layer, fixed state pools
of `max_num_seqs` slots: conv state (model dtype) and recurrent state (fp32),
sized by the model's `state_shapes()`; their bytes come off the KV budget.
"""

from __future__ import annotations

import math
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


def state_bytes(runner: ModelRunner) -> int:
    """Bytes of every linear-attention layer's state pools (0 for non-hybrid models)."""
    text = runner.model_config.text
    layers = text.num_hidden_layers - num_full_attention_layers(runner)
    if layers == 0:
        return 0
    conv, recurrent = runner.model.state_shapes()
    elem = torch.empty((), dtype=runner.dtype).element_size()
    per_slot = math.prod(conv) * elem + math.prod(recurrent) * 4
    return layers * runner.config.max_num_seqs * per_slot


def num_blocks_for(runner: ModelRunner, max_model_len: int) -> int:
    """`num_gpu_blocks` if given; else from CUDA memory after a profiling pass, or the CPU bound."""
    cfg = runner.config
    if cfg.num_gpu_blocks is not None:
        return cfg.num_gpu_blocks
    per_block = block_bytes(runner)
    if runner.device.type == "cuda":
        available = _profile_cuda(runner, max_model_len) - state_bytes(runner)
        blocks = int(available // per_block)
    else:
        blocks = int((cfg.cpu_kv_cache_gb * 2**30 - state_bytes(runner)) // per_block)
        # More than every running sequence at full length is never used on CPU.
        blocks = min(blocks, cfg.max_num_seqs * -(-max_model_len // cfg.block_size) + 1)
    if blocks < 1:
        states = state_bytes(runner)
        hint = f", after {states / 2**30:.2f} GiB of linear-attention state for max_num_seqs slots" if states else ""
        raise KVCacheTooSmallError(
            f"no memory left for the KV cache (one block is {per_block} bytes{hint}); lower "
            "max_num_batched_tokens or max_num_seqs, or raise gpu_memory_utilization / cpu_kv_cache_gb"
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
    """One cache pair per decoder layer, zeroed.

    Full-attention layer: `[num_blocks, block_size, Hkv_per_rank, D]` key/value
    caches. Linear-attention layer: `[max_num_seqs, *conv]` conv state (model
    dtype) and `[max_num_seqs, *recurrent]` fp32 recurrent state.
    Zeroed, not empty: padded block-table entries may be read (and masked),
    and NaN garbage times a zero weight would still be NaN.
    """
    text = runner.model_config.text
    dev, dtype = runner.device, runner.dtype
    shape = (num_blocks, runner.config.block_size, runner.model.num_kv_heads, text.head_dim)
    caches = []
    for i in range(text.num_hidden_layers):
        if text.layer_type(i) == "full_attention":
            caches.append((torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev)))
        else:
            conv, recurrent = runner.model.state_shapes()
            slots = runner.config.max_num_seqs
            caches.append((
                torch.zeros((slots, *conv), dtype=dtype, device=dev),
                torch.zeros((slots, *recurrent), dtype=torch.float32, device=dev),
            ))
    return caches
