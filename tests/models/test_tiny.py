"""Tiny checkpoints: loadable by transformers, deterministic, consistent ids."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models.tiny import ARCHS, main, write_tiny_checkpoint

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _hf_model_class(arch: str) -> type:
    import transformers as tf

    return {
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration,
        "qwen3_5": tf.Qwen3_5ForConditionalGeneration,
        "qwen3_5_moe": tf.Qwen3_5MoeForConditionalGeneration,
    }[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_back_with_transformers(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    model, info = _hf_model_class(arch).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # What transformers holds is what the file holds (no re-init on load).
    state = model.state_dict()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert any(k.startswith("model.visual.") for k in keys)
        assert any(k.startswith("model.language_model.") for k in keys)
        for key in keys:
            saved = f.get_tensor(key)
            if key in state and state[key].shape == saved.shape:
                torch.testing.assert_close(state[key], saved, rtol=0, atol=0)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [type(model).__name__]


@pytest.mark.parametrize("arch", ARCHS)
def test_token_ids_match_tokenizer(tiny_checkpoint, arch):
    from transformers import AutoTokenizer

    path = tiny_checkpoint(arch)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg["vision_end_token_id"] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg["text_config"]["vocab_size"] >= len(tok)
    gen = json.loads((path / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    assert tok.eos_token == "<|im_end|>"


def test_tokenizer_round_trip_and_specials(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen3_vl"))
    assert 1000 <= len(tok) <= 2000
    text = "Hello, world! Ünïcode 🙂 and numbers 12345.\n  indented\tline"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    specials = "".join(SPECIALS)
    ids = tok(specials)["input_ids"]
    # Each special token is one id, never split into bytes.
    assert ids == [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    assert len(set(ids)) == len(SPECIALS)
    assert tok.decode(ids, skip_special_tokens=True) == ""
    mixed = "a<|image_pad|>b"
    assert tok.decode(tok(mixed)["input_ids"]) == mixed


def test_chat_template(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen3_vl"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is this?"},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And now?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>system\nBe brief.<|im_end|>\n"
    ids = tok(text)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 1


def test_image_processor_config_loads(tiny_checkpoint):
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil.from_pretrained(tiny_checkpoint("qwen3_vl"))
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (16, 2, 2)
    for side, lo, hi in [(64, 4, 64), (512, 256, 1024)]:
        n = proc.get_number_of_image_patches(side, side, {})
        assert lo <= n <= hi


def test_hf_forward_with_image(tiny_checkpoint):
    """The config's ids and vision dims are coherent enough for HF to run an image."""
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    path = tiny_checkpoint("qwen3_vl_moe")
    tok = AutoTokenizer.from_pretrained(path)
    proc = Qwen2VLImageProcessorPil.from_pretrained(path)
    model = _hf_model_class("qwen3_vl_moe").from_pretrained(path).eval()
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (70, 130, 3), dtype=np.uint8))
    pix = proc(images=[img], return_tensors="pt")
    n_tok = int(pix["image_grid_thw"].prod()) // 4
    pad = "<|image_pad|>"
    text = f"<|vision_start|>{pad * n_tok}<|vision_end|>Describe."
    ids = tok(text, return_tensors="pt")["input_ids"]
    mm = (ids == tok.convert_tokens_to_ids(pad)).long()
    with torch.no_grad():
        out = model(
            input_ids=ids,
            mm_token_type_ids=mm,
            pixel_values=pix["pixel_values"],
            image_grid_thw=pix["image_grid_thw"],
        )
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_deterministic_for_seed(tmp_path):
    a = write_tiny_checkpoint("qwen3_vl", tmp_path / "a", seed=3)
    b = write_tiny_checkpoint("qwen3_vl", tmp_path / "b", seed=3)
    c = write_tiny_checkpoint("qwen3_vl", tmp_path / "c", seed=4)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_seed_does_not_leak_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    write_tiny_checkpoint("qwen3_vl", tmp_path / "x", seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_cli(tmp_path, capsys):
    main(["--arch", "qwen3_5", "--out", str(tmp_path / "cli"), "--seed", "1"])
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert str(tmp_path / "cli") in capsys.readouterr().out


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="qwen3_vl_moe"):
        write_tiny_checkpoint("llama", tmp_path)


@pytest.mark.parametrize("name", ["qwen3-vl-30b-a3b", "qwen3.5-0.8b"])
def test_random_checkpoint_of_real_architecture(tmp_path, name):
    """The real config, shrunk in depth/vocab/experts so it runs on CPU in CI."""
    from pathlib import Path

    from models.config import load_model_config
    from models.processor import ImageProcessor
    from models.random_weights import write_random_checkpoint

    src = Path(__file__).resolve().parents[2] / "configs" / "models" / f"{name}.json"
    data = json.loads(src.read_text())
    text, vision = data["text_config"], data["vision_config"]
    text.update(vocab_size=512, num_hidden_layers=4, hidden_size=256, intermediate_size=512)
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:4]
    if "num_experts" in text:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    vision.update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256)
    vision["deepstack_visual_indexes"] = [0, 1] if vision["deepstack_visual_indexes"] else []
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(data))
    out = write_random_checkpoint(cfg_path, tmp_path / "ckpt", dtype=torch.bfloat16, seed=0)
    cfg = load_model_config(out)
    assert cfg.architecture == data["architectures"][0]
    assert cfg.text.head_dim == text["head_dim"] and cfg.text.num_hidden_layers == 4
    assert cfg.eos_token_ids == (text["eos_token_id"],)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        assert f.get_slice(key).get_dtype() == "BF16"
    assert ImageProcessor.from_pretrained(out).patch_size == 16
    model = _hf_model_class(
        {"Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe", "Qwen3_5ForConditionalGeneration": "qwen3_5"}[
            cfg.architecture
        ]
    ).from_pretrained(out)
    assert model.dtype == torch.bfloat16
