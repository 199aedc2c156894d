"""A layer's input norm folded into its qkv projection at decode rows
(`ColumnParallelLinear.norm_forward`: one ops.add_rms_norm_linear_small) against norm-then-qkv
on the same tiny models: Qwen3-VL, Qwen3-VL-MoE (its pending combines keep their own fused
norm) and Qwen3.5 (full-attention layers only). On the GPU also with the qkv streamed either
way (then bit for bit) and a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

from models.config import load_model_config
from models.layers.attention import AttentionMetadata
from models.layers.linear import (
    NORM_FOLD_ROWS, ColumnParallelLinear, set_input_norm_folded, set_streamed_small_rows,
)
from models.layers.moe import set_block_kernel, set_fused_decode
from models.loader import CheckpointReader
from models.qwen3 import Qwen3ForCausalLM
from models.qwen3_5 import Qwen3_5ForCausalLM
from tests.models.op_calls import count_op_calls

MODELS = {"qwen3_vl": Qwen3ForCausalLM, "qwen3_vl_moe": Qwen3ForCausalLM, "qwen3_5": Qwen3_5ForCausalLM}


def _model(path, arch: str, dtype: torch.dtype, device: str):
    model = MODELS[arch](load_model_config(path), dtype=dtype, device=device)
    model.load_weights(CheckpointReader(path))
    set_fused_decode(model, False)  # the next norm gets a tensor, not a pending combine
    return model.to(device)


@torch.no_grad()
def _hidden(model, tokens: int, folded: bool | None, device: str, seed: int = 0) -> torch.Tensor:
    set_input_norm_folded(model, folded)
    ids = torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(seed)).to(device)
    positions = torch.arange(tokens, device=device).expand(3, -1)
    return model(ids, positions, AttentionMetadata.packed([tokens], device), None, None)


def _folding_layers(model, arch: str) -> int:
    """Layers after the first whose mixer starts with the qkv projection."""
    layers = model.model.layers[1:]
    return sum(1 for layer in layers if arch != "qwen3_5" or layer.layer_type != "linear_attention")


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("tokens", [1, 5, 16, 17])
def test_folded_equals_norm_then_qkv_cpu(tiny_checkpoint, monkeypatch, arch, tokens):
    """fp32 CPU: the CPU op runs the two ops, so the hidden states are equal bit for bit; the
    fold is the CPU default and applies up to NORM_FOLD_ROWS rows."""
    model = _model(tiny_checkpoint(arch), arch, torch.float32, "cpu")
    calls = count_op_calls(monkeypatch, "add_rms_norm_linear_small")
    plain = _hidden(model, tokens, False, "cpu")
    assert calls == [0]
    folded = _hidden(model, tokens, None, "cpu")
    assert calls == [_folding_layers(model, arch) if tokens <= NORM_FOLD_ROWS else 0]
    torch.testing.assert_close(folded, plain, rtol=0, atol=0)


def test_pending_combine_keeps_its_own_norm(tiny_checkpoint, monkeypatch):
    """With the fused MoE decode path, each norm after a MoE block sums its combine
    (ops.moe_combine_add_rms_norm): no fold there. (The one-op block path, ahead of it, hands
    back a plain tensor: off here.)"""
    model = _model(tiny_checkpoint("qwen3_vl_moe"), "qwen3_vl_moe", torch.float32, "cpu")
    set_block_kernel(model, False)
    calls = count_op_calls(monkeypatch, "add_rms_norm_linear_small")
    plain = _hidden(model, 3, False, "cpu")
    set_fused_decode(model, True)
    fused = _hidden(model, 3, None, "cpu")
    assert calls == [0]
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_cpu_folds_decode_rows_unless_told_not_to():
    linear = ColumnParallelLinear(16, 32)
    x = torch.randn(2, 16)
    assert linear.folds_norm is None and linear._folds_norm(x)
    assert not linear._folds_norm(torch.randn(NORM_FOLD_ROWS + 1, 16))
    linear.folds_norm = False
    assert not linear._folds_norm(x)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("tokens", [1, 16])
def test_folded_bf16_gpu(tiny_checkpoint, monkeypatch, arch, tokens):
    """bf16 CUDA: with the qkv streamed in both runs (`set_streamed_small_rows`) the fold is
    exact; against cuBLAS' qkv it is close."""
    model = _model(tiny_checkpoint(arch), arch, torch.bfloat16, "cuda")
    calls = count_op_calls(monkeypatch, "add_rms_norm_linear_small")
    cublas = _hidden(model, tokens, False, "cuda")
    set_streamed_small_rows(model, True)
    streamed = _hidden(model, tokens, False, "cuda")
    assert calls == [0]
    folded = _hidden(model, tokens, True, "cuda")
    assert calls == [_folding_layers(model, arch)]
    torch.testing.assert_close(folded, streamed, rtol=0, atol=0)
    scale = cublas.float().abs().max()
    assert (folded.float() - cublas.float()).abs().max() <= 5e-2 * scale


@pytest.mark.gpu
def test_folded_step_in_a_cuda_graph(tiny_checkpoint):
    model = _model(tiny_checkpoint("qwen3_vl"), "qwen3_vl", torch.bfloat16, "cuda")
    set_input_norm_folded(model, True)
    ids = torch.randint(0, 1000, (1,), device="cuda")
    positions = torch.zeros(3, 1, dtype=torch.long, device="cuda")
    meta = AttentionMetadata.packed([1], "cuda")
    step = lambda: model(ids, positions, meta, None, None)  # noqa: E731
    with torch.no_grad():
        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
