"""The fused MoE decode path (router + routing in one op, the combine folded into the next
norm) and the one-op block path (`ops.moe_decode_block`: the layer's post-attention add + norm
and the whole block) against the unfused path of the same model: greedy tokens and logits on a
tiny Qwen3-VL-MoE; on the GPU also a captured CUDA graph of a decode step on either == eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.config import load_model_config
from models.layers.moe import SparseMoeBlock, set_block_kernel, set_fused_decode
from models.loader import CheckpointReader
from models.qwen3 import Qwen3ForCausalLM
from tests.models.op_calls import count_op_calls
from tests.models.test_qwen3_parity import BLOCK, step_metadata

STEPS = 6


def _model(path, dtype: torch.dtype, device: str) -> Qwen3ForCausalLM:
    model = Qwen3ForCausalLM(load_model_config(path), dtype=dtype, device=device)
    model.load_weights(CheckpointReader(path))
    return model.to(device)


def _on(meta, device: str):
    return dataclasses.replace(meta, **{
        f.name: getattr(meta, f.name).to(device)
        for f in dataclasses.fields(meta) if isinstance(getattr(meta, f.name), torch.Tensor)
    })


def _caches(model: Qwen3ForCausalLM, device: str, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    text = model.config.text
    shape = (16, BLOCK, model.num_kv_heads, text.head_dim)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(text.num_hidden_layers)]


@torch.no_grad()
def _greedy(
    model: Qwen3ForCausalLM, prompt: torch.Tensor, fused: bool, forced: list[int] | None = None,
    block: bool = False,
) -> tuple[list[int], torch.Tensor]:
    """Prefill `prompt`, then STEPS greedy decode steps from paged caches (feeding `forced` tokens
    instead when given), on the fused decode path or not and the block path or not:
    (tokens fed, logits [1 + STEPS, V])."""
    set_fused_decode(model, fused)
    set_block_kernel(model, block)
    device, dtype = prompt.device, next(model.parameters()).dtype
    caches = _caches(model, device, dtype)
    tables = torch.arange(16, dtype=torch.int32)[None]
    n = len(prompt)
    positions = torch.arange(n + STEPS, device=device).expand(3, -1)
    meta = _on(step_metadata([(0, n)], tables), device)
    logits = [model.compute_logits(model(prompt, positions[:, :n], meta, caches, None))[-1:]]
    tokens = []
    for step in range(STEPS):
        token = logits[-1].argmax(-1) if forced is None else torch.tensor([forced[step]], device=device)
        tokens.append(int(token))
        meta = _on(step_metadata([(n + step, 1)], tables), device)
        logits.append(model.compute_logits(model(token, positions[:, n + step : n + step + 1], meta, caches, None)))
    return tokens, torch.cat(logits)


@pytest.mark.parametrize("prompt_len", [7, 23])  # fused prefill (<= 16 tokens) or unfused
def test_fused_decode_equals_unfused_fp32(tiny_checkpoint, monkeypatch, prompt_len):
    model = _model(tiny_checkpoint("qwen3_vl_moe"), torch.float32, "cpu")
    assert all(block.shared_expert is None for block in model.modules() if isinstance(block, SparseMoeBlock))
    prompt = torch.randint(0, 1000, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    calls = count_op_calls(monkeypatch, "moe_gate_route", "moe_combine_add_rms_norm")
    tokens, logits = _greedy(model, prompt, fused=False)
    assert calls == [0, 0]
    fused_tokens, fused_logits = _greedy(model, prompt, fused=True)
    layers = model.config.text.num_hidden_layers
    steps = STEPS + (prompt_len <= 16)
    # Every layer routes fused; every norm after a MoE block takes its combine (the final one too).
    assert calls == [layers * steps, layers * steps]
    assert fused_tokens == tokens
    torch.testing.assert_close(fused_logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt_len", [7, 23])  # block prefill (<= 8 tokens) or not
def test_block_kernel_equals_unfused_fp32(tiny_checkpoint, monkeypatch, prompt_len):
    model = _model(tiny_checkpoint("qwen3_vl_moe"), torch.float32, "cpu")
    prompt = torch.randint(0, 1000, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    calls = count_op_calls(monkeypatch, "moe_decode_block")
    tokens, logits = _greedy(model, prompt, fused=False)
    assert calls == [0]
    block_tokens, block_logits = _greedy(model, prompt, fused=True, block=True)
    steps = STEPS + (prompt_len <= 8)
    assert calls == [model.config.text.num_hidden_layers * steps]  # every MoE layer of every step
    assert block_tokens == tokens
    torch.testing.assert_close(block_logits, logits, rtol=1e-4, atol=1e-4)


def test_cpu_default_takes_the_block_and_shared_expert_blocks_do_not(tiny_checkpoint):
    block = _model(tiny_checkpoint("qwen3_vl_moe"), torch.float32, "cpu").model.layers[0].mlp
    hidden = block.experts.hidden_size
    assert block.block_kernel is None and block.takes_block(torch.randn(8, hidden))
    assert not block.takes_block(torch.randn(9, hidden)) and not block.takes_block(torch.randn(0, hidden))
    block.block_kernel = False
    assert not block.takes_block(torch.randn(1, hidden))
    shared = SparseMoeBlock(16, 12, 6, 3, norm_topk_prob=True, shared_expert_intermediate_size=20)
    assert not shared.takes_block(torch.randn(2, 16))


def test_cpu_default_is_fused_and_shared_expert_blocks_are_not(tiny_checkpoint):
    block = _model(tiny_checkpoint("qwen3_vl_moe"), torch.float32, "cpu").model.layers[0].mlp
    x = torch.randn(3, block.experts.hidden_size)
    assert block.fused_decode is None and block.defers_combine(x)
    assert not block.defers_combine(torch.randn(17, block.experts.hidden_size))
    shared = SparseMoeBlock(16, 12, 6, 3, norm_topk_prob=True, shared_expert_intermediate_size=20)
    assert not shared.defers_combine(torch.randn(2, 16))


@pytest.mark.gpu
def test_fused_decode_bf16_gpu_tokens_match_unfused(tiny_checkpoint, monkeypatch):
    model = _model(tiny_checkpoint("qwen3_vl_moe"), torch.bfloat16, "cuda")
    prompt = torch.randint(0, 1000, (23,), generator=torch.Generator().manual_seed(1)).cuda()
    calls = count_op_calls(monkeypatch, "moe_gate_route", "moe_combine_add_rms_norm")
    tokens, logits = _greedy(model, prompt, fused=False)
    _, fused_logits = _greedy(model, prompt, fused=True, forced=tokens)  # the same tokens in
    assert calls[0] > 0 and calls[1] > 0
    # The fused router keeps its logits fp32 (unfused: rounded to bf16), which may flip an
    # expert at a near-tie; anything more is a bug.
    same = int((fused_logits.argmax(-1) == logits.argmax(-1)).sum())
    assert same >= len(logits) - 1, f"greedy tokens equal on {same} / {len(logits)} steps"
    scale = logits.float().abs().max()
    assert (fused_logits.float() - logits.float()).abs().max() <= 5e-2 * scale


@pytest.mark.gpu
def test_block_kernel_bf16_gpu_tokens_match_unfused(tiny_checkpoint, monkeypatch):
    model = _model(tiny_checkpoint("qwen3_vl_moe"), torch.bfloat16, "cuda")
    prompt = torch.randint(0, 1000, (23,), generator=torch.Generator().manual_seed(1)).cuda()
    calls = count_op_calls(monkeypatch, "moe_decode_block")
    tokens, logits = _greedy(model, prompt, fused=False)
    _, block_logits = _greedy(model, prompt, fused=False, forced=tokens, block=True)  # the same tokens in
    assert calls[0] == model.config.text.num_hidden_layers * STEPS
    # The same roundings as the unfused path but other fp32 summation orders, which may flip an
    # expert at a near-tie; anything more is a bug.
    same = int((block_logits.argmax(-1) == logits.argmax(-1)).sum())
    assert same >= len(logits) - 1, f"greedy tokens equal on {same} / {len(logits)} steps"
    scale = logits.float().abs().max()
    assert (block_logits.float() - logits.float()).abs().max() <= 5e-2 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "block"])
@pytest.mark.parametrize("batch", [1, 4, 8, 16])
def test_fused_decode_step_graph_equals_eager_gpu(tiny_checkpoint, batch, path):
    """A fused (or one-op block) decode step captured in a CUDA graph replays (twice: the
    arrival and barrier counters need no reset) to the eager step's logits and KV caches."""
    model = _model(tiny_checkpoint("qwen3_vl_moe"), torch.bfloat16, "cuda")
    set_fused_decode(model, path == "fused")
    set_block_kernel(model, path == "block")
    caches = _caches(model, "cuda", torch.bfloat16)
    for k, v in caches:
        k.normal_()
        v.normal_()
    tables = torch.arange(16, dtype=torch.int32).view(batch, -1)
    cached = tables.shape[1] * BLOCK - 1  # each sequence's last cache slot takes the new token
    meta = _on(step_metadata([(cached, 1)] * batch, tables), "cuda")
    ids = torch.randint(0, 1000, (batch,), device="cuda")
    positions = torch.full((3, batch), cached, device="cuda")
    step = lambda: model.compute_logits(model(ids, positions, meta, caches, None))  # noqa: E731
    with torch.no_grad():
        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        first = out.clone()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, first, rtol=0, atol=0)
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2 * eager.abs().max().item())
    assert torch.equal(out.argmax(-1), eager.argmax(-1))
    assert all(int(b.route_arrivals) == 0 for b in model.modules() if isinstance(b, SparseMoeBlock))
    assert all(int(b.block_barrier) & 0x7FFFFFFF == 0 for b in model.modules() if isinstance(b, SparseMoeBlock))
