"""Tiny random HF checkpoints of every supported architecture, for CPU tests.

`write_tiny_checkpoint(arch, out_dir, seed)` builds the model through
transformers' own class of that architecture (the registry entry's name) under
`torch.manual_seed(seed)` and saves it with `save_pretrained`, so the tensor
names and layouts are HF's, not ours. Beside the weights it writes a byte-level
BPE tokenizer trained offline on a small built-in corpus (Qwen special tokens,
Qwen-style chat template), `preprocessor_config.json` for
`Qwen2VLImageProcessor(Pil)` and `generation_config.json`.

Checkpoint layouts worth knowing (`save_pretrained` of transformers 5.24 here and
5.17 on the GPU box write the same):
- qwen3_vl_moe: experts are fused 3-D parameters saved as they live in memory,
  `mlp.experts.gate_up_proj [E, 2*I, H]` (gate rows first, then up) and
  `mlp.experts.down_proj [E, H, I]`, plus `mlp.gate.weight [E, H]`. The
  published Qwen3-VL-MoE checkpoints store the transposes (`[E, H, 2*I]`,
  `[E, I, H]`); transformers transposes on load when the shape says so. The
  tiny dims keep H != 2*I != I so the orientation is unambiguous from shapes.
- qwen3_5_moe: experts are saved per expert,
  `mlp.experts.{e}.{gate,up,down}_proj.weight`, plus `mlp.shared_expert.*`
  and `mlp.shared_expert_gate.weight [1, H]`.
- qwen3_5 full-attention layers have the output gate fused into `q_proj`
  (`[2 * heads * head_dim, H]`); linear-attention layers hold
  `linear_attn.{in_proj_qkv,in_proj_z,in_proj_a,in_proj_b,conv1d,norm,out_proj,A_log,dt_bias}`.

Tiny dims: text hidden 64, 4 q / 2 kv heads; Qwen3-VL: 3 layers, head_dim 16,
mrope_section [4, 2, 2] interleaved, deepstack on ViT layers [1, 2]; Qwen3.5:
layers linear x3 + full, head_dim 32, partial_rotary_factor 0.25 (8 rotary dims,
section [2, 1, 1]). ViT: depth 4, hidden 32, 2 heads, patch 16, merge 2, 64
learned positions (8x8). MoE: 8 experts, top-2, moe_intermediate 24 (+ a shared
expert of 40 for Qwen3.5). Dense archs tie the LM head; MoE archs do not. Norm
weights and biases are randomized (HF leaves them constant).

CLI: `python -m models.tiny --arch qwen3_vl --out DIR [--seed N]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from models.architectures import TINY, Architecture
from models.tiny_tokenizer import SPECIAL_TOKENS, write_tokenizer

# Tiny checkpoint names (each its architecture's HF model_type), from the registry.
ARCHS = tuple(TINY)

# Patch 16, merge 2: one image token per 32x32 px. These bounds give 4..1024
# patches (1..256 tokens); a 64x64 image is 16 patches, 512x512 is 1024.
IMAGE_MIN_PIXELS = 32 * 32 * 4
IMAGE_MAX_PIXELS = 32 * 32 * 256
# Video bounds are over all sampled frames (t * h * w): at most 64 tokens per frame
# pair for short clips, fewer for longer ones.
VIDEO_MIN_PIXELS = 32 * 32 * 4
VIDEO_MAX_PIXELS = 32 * 32 * 2 * 64
# Wider than HF's 0.02 so that logits and router scores are well separated
# (greedy/top-k parity is then not decided by float noise).
INIT_RANGE = 0.08


def _vision_config(deepstack: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        "hidden_act": "gelu_pytorch_tanh",
        "initializer_range": INIT_RANGE,
    }
    if deepstack:
        cfg["deepstack_visual_indexes"] = [1, 2]
    return cfg


def _text_config(vocab_size: int, tied: bool, **arch: Any) -> dict[str, Any]:
    """The decoder sizes both tiny families share, then the family's own keys `arch`."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "initializer_range": INIT_RANGE,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
        **arch,
    }


# Expert sizes both MoE families share; each adds its own routing keys.
_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24}


def _qwen3_vl_text(vocab_size: int, moe: bool, tied: bool) -> dict[str, Any]:
    cfg = _text_config(
        vocab_size, tied,
        num_hidden_layers=3,
        head_dim=16,
        # head_dim 16 -> 8 rotary frequencies; interleaved T/H/W like Qwen3-VL.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    )
    if moe:
        cfg.update(_MOE, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return cfg


def _qwen3_5_text(vocab_size: int, moe: bool, tied: bool) -> dict[str, Any]:
    cfg = _text_config(
        vocab_size, tied,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        # head_dim 32 * 0.25 -> 8 rotary dims -> 4 frequencies.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    if moe:
        cfg.update(_MOE, shared_expert_intermediate_size=40)
    return cfg


def _architecture(name: str) -> Architecture:
    if name not in TINY:
        raise ValueError(f"unknown tiny arch {name!r}; choose one of {ARCHS}")
    return TINY[name]


def tiny_config_dict(name: str, special_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """The HF config kwargs of the tiny checkpoint `name` (text_config, vision_config, token ids).

    Its registry entry decides the shape: hybrid -> the Qwen3.5 decoder (no
    deepstack), else Qwen3-VL's; MoE adds experts.
    """
    arch = _architecture(name)
    # Dense archs tie the LM head (as Qwen3-VL-2B / Qwen3.5-0.8B do); MoE do not.
    tied = not arch.moe
    text_config = _qwen3_5_text if arch.hybrid else _qwen3_vl_text
    text = text_config(vocab_size, arch.moe, tied)
    vision = _vision_config(deepstack=not arch.hybrid)
    text["eos_token_id"] = special_ids["<|im_end|>"]
    text["pad_token_id"] = special_ids["<|endoftext|>"]
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": special_ids["<|image_pad|>"],
        "video_token_id": special_ids["<|video_pad|>"],
        "vision_start_token_id": special_ids["<|vision_start|>"],
        "vision_end_token_id": special_ids["<|vision_end|>"],
        "tie_word_embeddings": tied,
    }


def _perturb_vectors(model: torch.nn.Module) -> None:
    """Randomize norm weights and biases, which HF initializes to constants.

    With all-ones (or, for Qwen3.5's `1 + w` norms, all-zeros) weights, a parity
    test cannot tell `w` from `1 + w` or a missing bias; random ones can.
    """
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))


def _preprocessor_config() -> dict[str, Any]:
    # Same keys as the published Qwen3-VL preprocessor_config.json; transformers 5
    # reads `size` (shortest_edge = min pixels, longest_edge = max pixels).
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
    }


def _video_preprocessor_config() -> dict[str, Any]:
    # The published Qwen3-VL / Qwen3.5 layout (fps, frame bounds and mean/std left to
    # the class defaults); a small pixel budget so test clips stay a few tokens per frame.
    return {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
    }


def _generation_config(special_ids: dict[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        "pad_token_id": special_ids["<|endoftext|>"],
        "do_sample": False,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tiny_checkpoint(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `arch` into `out_dir` and return it.

    Args:
        arch: one of `ARCHS`.
        out_dir: directory (created if missing).
        seed: weights are drawn under `torch.manual_seed(seed)`; same seed,
            same tensors.
    Returns:
        `out_dir` as a Path; `from_pretrained(out_dir)` loads model and tokenizer.
    """
    import transformers

    model_cls = getattr(transformers, _architecture(arch).name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special_ids, vocab_len = write_tokenizer(out)
    vocab_size = -(-vocab_len // 64) * 64  # pad like real checkpoints do
    hf_config = transformers.AutoConfig.for_model(arch, **tiny_config_dict(arch, special_ids, vocab_size))
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_cls(hf_config).eval()
        _perturb_vectors(model)
    finally:
        torch.random.set_rng_state(rng_state)
    model.save_pretrained(out, safe_serialization=True)
    _write_json(out / "preprocessor_config.json", _preprocessor_config())
    _write_json(out / "video_preprocessor_config.json", _video_preprocessor_config())
    _write_json(out / "generation_config.json", _generation_config(special_ids))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_checkpoint(args.arch, args.out, seed=args.seed)
    print(path)


__all__ = ["ARCHS", "SPECIAL_TOKENS", "tiny_config_dict", "write_tiny_checkpoint"]

if __name__ == "__main__":
    main()
