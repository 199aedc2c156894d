"""`init_random_weights` (load_format dummy, bench/moe.py): transformers' init rule, per TP rank."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.config import model_config_from_hf
from models.layers.parallel import ParallelContext
from models.loader import fill_weights
from models.random_weights import init_random_weights
from models.registry import build_language_model, build_vision_model

STD = 0.05  # not transformers' default 0.02, so the config's value is what the init must use


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    data = json.loads((tiny_checkpoint("qwen3_5_moe") / "config.json").read_text())
    data["text_config"]["initializer_range"] = STD
    data["vision_config"]["initializer_range"] = 2 * STD
    return model_config_from_hf(data)


def _decoder(config, rank: int = 0, size: int = 1):
    # Building a TP shard needs no process group: collectives run only in forward.
    return build_language_model(config, ParallelContext(rank, size), torch.float32, "cpu")


def test_decoder_follows_transformers_init_rule(config) -> None:
    model = _decoder(config)
    init_random_weights(model, config.text.initializer_range)
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    kinds = {"A_log": 0, "dt_bias": 0, "norm": 0, "matrix": 0}
    for name, p in params.items():
        leaf = name.rpartition(".")[2]
        if leaf == "A_log":  # transformers: log(U(0.01, 16)) per value head
            assert p.dtype == torch.float32 and p.exp().min() >= 0.01 - 1e-6 and p.exp().max() <= 16 + 1e-4
            assert p.unique().numel() == p.numel()
            kinds["A_log"] += 1
        elif leaf == "dt_bias":
            assert torch.equal(p, torch.ones_like(p))
            kinds["dt_bias"] += 1
        elif p.dim() == 1:  # RMSNorm weights, Qwen3.5's 1 + w included (transformers: w = 0)
            assert torch.equal(p, torch.ones_like(p)), name
            kinds["norm"] += 1
        else:
            assert abs(p.mean().item()) < 4 * STD / math.sqrt(p.numel()) + 1e-3, name
            if p.numel() >= 4096:
                assert p.std().item() == pytest.approx(STD, rel=0.1), name
            kinds["matrix"] += 1
    assert all(kinds.values()), kinds


def test_vision_tower_biases_zero_layer_norms_one(config) -> None:
    tower = build_vision_model(config, torch.float32, "cpu")
    fill_weights(tower, "/nonexistent", "dummy", config.vision.initializer_range)
    for name, p in tower.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.numel() >= 4096:  # patch and position embeddings, the blocks' and mergers' linears
            assert p.std().item() == pytest.approx(2 * STD, rel=0.1), name


def test_tp_ranks_share_replicated_params_and_differ_in_shards(config) -> None:
    ranks = [_decoder(config, r, 2) for r in (0, 1)]
    again = _decoder(config, 1, 2)
    for rank, model in enumerate([*ranks, again]):
        init_random_weights(model, STD, seed=7, rank=rank if model is not again else 1)
    p0, p1, p1_again = (dict(m.named_parameters()) for m in (*ranks, again))
    assert all(torch.equal(p1[n], p1_again[n]) for n in p1)  # deterministic per (seed, rank)
    layer = "model.layers.0."
    for replicated in ("mlp.gate.weight", "mlp.shared_expert_gate.weight", "input_layernorm.weight"):
        assert torch.equal(p0[layer + replicated], p1[layer + replicated]), replicated
    for shard in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "linear_attn.in_proj.weight",
                  "linear_attn.A_log", "mlp.shared_expert.down_proj.weight"):
        assert p0[layer + shard].shape == p1[layer + shard].shape
        assert not torch.equal(p0[layer + shard], p1[layer + shard]), shard
    assert not torch.equal(p0["model.embed_tokens.weight"], p1["model.embed_tokens.weight"])


def test_fill_weights_rejects_unknown_format(config) -> None:
    with pytest.raises(ValueError, match="load_format must be one of \\['auto', 'dummy'\\], got 'random'"):
        fill_weights(_decoder(config), "/nonexistent", "random", STD)
