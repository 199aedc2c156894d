"""Task selection and lazy, per-architecture model class resolution."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from models.architectures import ARCHITECTURES, TINY
from models.config import ModelConfig, TextConfig, UnsupportedArchitectureError, load_model_config
from models.interface import LanguageModel
from models.layers.moe import SparseMoeBlock
from models.registry import ModelImportError, TaskSpec, build_language_model, build_vision_model, get_task
from models.tiny import ARCHS

TEXT_ARCHITECTURES = [name for name, arch in ARCHITECTURES.items() if not arch.is_vl]

TEXT = TextConfig(
    vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=4,
)  # fmt: skip


def _text_only(arch: str) -> ModelConfig:
    return ModelConfig(architecture=arch, model_type="qwen3", text=TEXT)


def test_entries_are_keyed_by_name():
    assert all(name == arch.name for name, arch in ARCHITECTURES.items())
    assert set(ARCHS) == {arch.tiny for arch in ARCHITECTURES.values() if arch.tiny}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoint_has_its_entry_facts(tiny_checkpoint, arch):
    """The entry's facts agree with what the parsed tiny checkpoint says of itself."""
    entry = TINY[arch]
    cfg = load_model_config(tiny_checkpoint(arch))
    assert cfg.architecture == entry.name and cfg.model_type == arch
    assert (cfg.vision is not None) == entry.is_vl
    assert cfg.text.is_hybrid == entry.hybrid and cfg.text.is_moe == entry.moe


@pytest.mark.parametrize("arch", ARCHS)
def test_built_language_models_meet_the_interface(tiny_checkpoint, arch):
    cfg = load_model_config(tiny_checkpoint(arch))
    lm = build_language_model(cfg, None, torch.float32, "cpu")
    assert isinstance(lm, LanguageModel)
    assert len(lm.layer_types) == cfg.text.num_hidden_layers
    assert [cfg.text.layer_type(i) for i in range(cfg.text.num_hidden_layers)] == list(lm.layer_types)
    assert (lm.state_shapes() is None) == (not TINY[arch].hybrid)
    assert lm.num_kv_heads == cfg.text.num_key_value_heads
    # Hybrid steps are capturable (state slots are static pools); MoE ones as far as the MoE block says.
    assert lm.supports_cuda_graphs
    moe = [m for m in lm.modules() if isinstance(m, SparseMoeBlock)]
    assert bool(moe) == TINY[arch].moe
    if moe:
        moe[-1].capturable = False
        assert not lm.supports_cuda_graphs


@pytest.mark.parametrize("arch", ARCHS)
def test_vl_architectures(tiny_checkpoint, arch):
    cfg = load_model_config(tiny_checkpoint(arch))
    assert TINY[arch].is_vl
    assert get_task(cfg) == TaskSpec("vl", True, None)
    off = get_task(cfg, disable_vision_encoder=True)
    assert off.task == "llm" and off.accepts_images is False
    assert "disable_vision_encoder" in off.reason and "rejected" in off.reason


@pytest.mark.parametrize("arch", TEXT_ARCHITECTURES)
def test_text_only_architectures(arch):
    for disabled in (False, True):
        spec = get_task(_text_only(arch), disable_vision_encoder=disabled)
        assert spec.task == "llm" and spec.accepts_images is False
        assert arch in spec.reason


def test_unknown_architecture():
    cfg = _text_only("LlamaForCausalLM")
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        get_task(cfg)
    with pytest.raises(UnsupportedArchitectureError):
        build_language_model(cfg, None, None, "cpu")


def _fake_module(monkeypatch, name: str, **classes) -> None:
    module = types.ModuleType(name)
    for cls_name, cls in classes.items():
        setattr(module, cls_name, cls)
    monkeypatch.setitem(sys.modules, name, module)


class _FakeLM:
    def __init__(self, config, parallel, dtype, device):
        self.args = (config, parallel, dtype, device)


class _FakeVision:
    def __init__(self, config, dtype, device):
        self.args = (config, dtype, device)


def test_builders_pass_the_contract_arguments(monkeypatch, tiny_checkpoint):
    _fake_module(monkeypatch, "models.qwen3", Qwen3ForCausalLM=_FakeLM)
    _fake_module(monkeypatch, "models.qwen3_vl.vision", Qwen3VLVisionModel=_FakeVision)
    cfg = load_model_config(tiny_checkpoint("qwen3_vl"))
    parallel = object()
    lm = build_language_model(cfg, parallel, "fp32", "cpu")
    assert isinstance(lm, _FakeLM) and lm.args == (cfg, parallel, "fp32", "cpu")
    vision = build_vision_model(cfg, "fp32", "cpu")
    assert isinstance(vision, _FakeVision) and vision.args == (cfg.vision, "fp32", "cpu")


def test_text_only_has_no_vision_model(monkeypatch):
    _fake_module(monkeypatch, "models.qwen3", Qwen3ForCausalLM=_FakeLM)
    cfg = _text_only("Qwen3ForCausalLM")
    assert isinstance(build_language_model(cfg, None, "fp32", "cpu"), _FakeLM)
    with pytest.raises(ValueError, match="no vision encoder"):
        build_vision_model(cfg, "fp32", "cpu")


def test_qwen3_5_import_failure_does_not_break_qwen3_vl(monkeypatch, tiny_checkpoint):
    _fake_module(monkeypatch, "models.qwen3", Qwen3ForCausalLM=_FakeLM)
    _fake_module(monkeypatch, "models.qwen3_vl.vision", Qwen3VLVisionModel=_FakeVision)
    monkeypatch.setitem(sys.modules, "models.qwen3_5", None)  # import raises ImportError
    qwen35 = load_model_config(tiny_checkpoint("qwen3_5"))
    with pytest.raises(ModelImportError) as err:
        build_language_model(qwen35, None, "fp32", "cpu")
    assert err.value.architecture == "Qwen3_5ForConditionalGeneration"
    assert "Qwen3_5ForConditionalGeneration" in str(err.value) and "models.qwen3_5" in str(err.value)
    assert isinstance(err.value.__cause__, ImportError)
    # Qwen3-VL is unaffected.
    vl = load_model_config(tiny_checkpoint("qwen3_vl"))
    assert isinstance(build_language_model(vl, None, "fp32", "cpu"), _FakeLM)
    assert isinstance(build_vision_model(vl, "fp32", "cpu"), _FakeVision)


def test_missing_class_names_the_architecture(monkeypatch, tiny_checkpoint):
    _fake_module(monkeypatch, "models.qwen3")  # module without the class
    cfg = load_model_config(tiny_checkpoint("qwen3_vl_moe"))
    with pytest.raises(ModelImportError, match="Qwen3VLMoeForConditionalGeneration"):
        build_language_model(cfg, None, "fp32", "cpu")


def test_disabled_vision_skips_vision_import(monkeypatch, tiny_checkpoint):
    _fake_module(monkeypatch, "models.qwen3", Qwen3ForCausalLM=_FakeLM)
    monkeypatch.setitem(sys.modules, "models.qwen3_vl.vision", None)
    cfg = load_model_config(tiny_checkpoint("qwen3_vl"))
    assert get_task(cfg, disable_vision_encoder=True).task == "llm"  # no vision import needed
    assert isinstance(build_language_model(cfg, None, "fp32", "cpu"), _FakeLM)
    with pytest.raises(ModelImportError):
        build_vision_model(cfg, "fp32", "cpu")


def test_vl_arch_without_vision_section_is_text_only():
    cfg = dataclasses.replace(_text_only("Qwen3VLForConditionalGeneration"))
    assert cfg.vision is None
    assert get_task(cfg).task == "llm"
