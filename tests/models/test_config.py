"""config.json parsing: tiny checkpoints vs transformers' own config classes, real
architecture files, text-only configs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.architectures import ARCHITECTURES
from models.config import (
    ConfigError,
    ModelConfig,
    TextConfig,
    UnsupportedArchitectureError,
    load_model_config,
    model_config_from_hf,
)
from models.tiny import ARCHS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def _hf_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _hf_text_rotary(hf):
    """transformers' text rotary embedding module for the config `hf` (meta device)."""
    import importlib

    import torch

    module = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    name = hf.architectures[0].replace("ForConditionalGeneration", "TextRotaryEmbedding")
    with torch.device("meta"):
        return getattr(module, name)(hf.text_config)


def _check_against_hf(cfg: ModelConfig, hf) -> None:
    """Our parse agrees with what transformers' config classes make of the file."""
    ht, hv = hf.text_config, hf.vision_config
    t = cfg.text
    assert cfg.architecture == hf.architectures[0]
    assert cfg.model_type == hf.model_type
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "hidden_act",
        "max_position_embeddings",
    ):
        assert getattr(t, name) == getattr(ht, name), name
    rope = ht.rope_parameters
    assert t.rope_theta == rope["rope_theta"]
    # The section transformers' rotary embedding uses (its own default when the file has none).
    assert list(t.mrope_section) == list(_hf_text_rotary(hf).mrope_section)
    assert t.mrope_interleaved
    assert t.partial_rotary_factor == rope.get("partial_rotary_factor", 1.0)
    assert t.tie_word_embeddings == hf.tie_word_embeddings
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(cfg, name) == getattr(hf, name), name
    v = cfg.vision
    for name in (
        "depth",
        "hidden_size",
        "intermediate_size",
        "num_heads",
        "out_hidden_size",
        "in_channels",
        "patch_size",
        "spatial_merge_size",
        "temporal_patch_size",
        "num_position_embeddings",
        "hidden_act",
    ):
        assert getattr(v, name) == getattr(hv, name), name
    assert list(v.deepstack_visual_indexes) == list(getattr(hv, "deepstack_visual_indexes", []) or [])
    if t.is_moe:
        assert t.num_experts == ht.num_experts
        assert t.num_experts_per_tok == ht.num_experts_per_tok
        assert t.moe_intermediate_size == ht.moe_intermediate_size
        assert t.shared_expert_intermediate_size == getattr(ht, "shared_expert_intermediate_size", 0)
    else:
        assert t.intermediate_size == ht.intermediate_size
    if cfg.architecture.startswith("Qwen3_5"):
        assert list(t.layer_types) == list(ht.layer_types)
        for name in (
            "linear_conv_kernel_dim",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
        ):
            assert getattr(t, name) == getattr(ht, name), name
        assert t.attn_output_gate and t.is_hybrid
    else:
        assert t.layer_types is None and not t.is_hybrid and not t.attn_output_gate


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoint_matches_transformers(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    cfg = load_model_config(path)
    _check_against_hf(cfg, _hf_config(path))
    assert cfg.vision is not None
    assert cfg.text.mrope_interleaved
    assert cfg.text.rotary_dim == 2 * sum(cfg.text.mrope_section)
    gen = json.loads((path / "generation_config.json").read_text())
    assert list(cfg.eos_token_ids[: len(gen["eos_token_id"])]) == gen["eos_token_id"]


def test_moe_layer_rule(tiny_checkpoint):
    cfg = load_model_config(tiny_checkpoint("qwen3_vl_moe")).text
    assert cfg.is_moe and cfg.norm_topk_prob
    assert all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    sparse = TextConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=2, head_dim=4,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=(3,),
    )  # fmt: skip
    assert [sparse.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_real_architecture_files(tmp_path, path):
    data = json.loads(path.read_text())
    cfg = model_config_from_hf(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_model_config(tmp_path) == cfg
    _check_against_hf(cfg, _hf_config(tmp_path))
    assert cfg.text.rotary_dim == 2 * sum(cfg.text.mrope_section)
    assert cfg.vision.out_hidden_size == cfg.text.hidden_size


def test_real_files_present():
    names = {p.stem for p in CONFIG_DIR.glob("*.json")}
    assert {"qwen3-vl-2b", "qwen3-vl-8b", "qwen3-vl-30b-a3b", "qwen3.5-0.8b"} <= names


def test_legacy_rope_scaling_spelling():
    """transformers 4.x configs keep rope_theta flat and mRoPE in rope_scaling."""
    text = {
        "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "rope_theta": 5e6,
        "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
    }  # fmt: skip
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32}
    cfg = model_config_from_hf(
        {"architectures": ["Qwen3VLForConditionalGeneration"], "text_config": text, "vision_config": vision}
    )
    assert cfg.text.rope_theta == 5e6
    assert cfg.text.mrope_section == (4, 2, 2) and cfg.text.mrope_interleaved


@pytest.mark.parametrize("arch, section", [("Qwen3VLForConditionalGeneration", (24, 20, 20)),
                                           ("Qwen3_5ForConditionalGeneration", (11, 11, 10))])
def test_vl_rope_defaults_follow_transformers(arch, section):
    """A VL file without mrope_section gets transformers' default section, and the sections are
    interleaved whatever the file's mrope_interleaved says (transformers always interleaves them)."""
    text = {
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2 * sum(section) * (4 if "3_5" in arch else 1),
        "partial_rotary_factor": 0.25 if "3_5" in arch else 1.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_interleaved": False},
    }  # fmt: skip
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 64}
    cfg = model_config_from_hf({"architectures": [arch], "text_config": text, "vision_config": vision})
    assert cfg.text.mrope_section == section and cfg.text.mrope_interleaved


def _write_text_only(tmp_path: Path, arch: str, **extra) -> Path:
    from transformers import Qwen3Config, Qwen3MoeConfig

    cls = Qwen3MoeConfig if "Moe" in arch else Qwen3Config
    kwargs = dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True, eos_token_id=7,
    )  # fmt: skip
    kwargs.update(extra)
    cls(architectures=[arch], **kwargs).save_pretrained(tmp_path)
    return tmp_path


def test_text_only_qwen3(tmp_path):
    cfg = load_model_config(_write_text_only(tmp_path, "Qwen3ForCausalLM"))
    assert cfg.architecture == "Qwen3ForCausalLM"
    assert cfg.vision is None and cfg.image_token_id is None
    assert cfg.text.mrope_section is None and cfg.text.rope_theta == 1e6
    assert cfg.text.head_dim == 8 and cfg.text.tie_word_embeddings and cfg.tie_word_embeddings
    assert not cfg.text.is_moe and cfg.eos_token_ids == (7,)


def test_text_only_qwen3_moe(tmp_path):
    path = _write_text_only(
        tmp_path, "Qwen3MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, norm_topk_prob=False, mlp_only_layers=[0],
    )  # fmt: skip
    t = load_model_config(path).text
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (4, 2, 16)
    assert t.norm_topk_prob is False  # Qwen3-MoE honours the flag
    assert [t.is_moe_layer(i) for i in range(2)] == [False, True]


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model_config(tmp_path)
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg
    assert all(a in msg for a in ARCHITECTURES)
    assert err.value.architecture == "LlamaForCausalLM"


def test_missing_architecture_field():
    with pytest.raises(UnsupportedArchitectureError, match="None"):
        model_config_from_hf({"model_type": "qwen3"})


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_model_config(tmp_path)
    with pytest.raises(ConfigError, match="text_config"):
        model_config_from_hf({"architectures": ["Qwen3VLForConditionalGeneration"]})
    with pytest.raises(ConfigError, match="rope_type"):
        model_config_from_hf(
            {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2,
             "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
        )  # fmt: skip
    with pytest.raises(ConfigError, match="num_experts"):  # a dense architecture with experts
        model_config_from_hf(
            {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2}
        )  # fmt: skip
    with pytest.raises(ConfigError, match="sliding"):
        model_config_from_hf(
            {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2, "use_sliding_window": True}
        )  # fmt: skip


@pytest.mark.parametrize(
    "change, match",
    [
        ({"text_config": {"mrope_section": [4, 2, 1]}}, "mrope_section"),
        ({"text_config": {"num_key_value_heads": 3}}, "num_key_value_heads"),
        ({"vision_config": {"deepstack_visual_indexes": [1, 9]}}, "deepstack"),
        ({"vision_config": {"out_hidden_size": 32}}, "out_hidden_size"),
    ],
)
def test_inconsistent_configs_rejected(tiny_checkpoint, change, match):
    data = json.loads((tiny_checkpoint("qwen3_vl") / "config.json").read_text())
    for section, values in change.items():
        if "mrope_section" in values:
            data[section]["rope_parameters"]["mrope_section"] = values["mrope_section"]
        else:
            data[section].update(values)
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf(data)
