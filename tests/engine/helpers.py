"""Shared helpers for the engine tests: prompts, images, transformers references."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from engine import LLM, SamplingParams
from engine.positions import expand_image_placeholders

TEXT = "The quick brown fox jumps over the lazy dog. Models generate text"


def image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def special(tokenizer, name: str) -> int:
    return tokenizer.convert_tokens_to_ids(name)


def prompt_ids(tokenizer, text: str, n_images: int) -> list[int]:
    """`text` with `n_images` `<|vision_start|><|image_pad|><|vision_end|>` blocks spread through it."""
    vs, pad, ve = (special(tokenizer, t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    words = text.split()
    ids: list[int] = []
    for i in range(n_images):
        ids += tokenizer.encode(" ".join(words[i * 3 : i * 3 + 3]) + " ", add_special_tokens=False)
        ids += [vs, pad, ve]
    ids += tokenizer.encode(" ".join(words[n_images * 3 :]), add_special_tokens=False)
    return ids


class HFReference:
    """transformers' own model and image processor loaded from the same directory."""

    def __init__(self, path: Path):
        import transformers

        self.model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)
        self.config = self.model.config

    def inputs(self, ids: list[int], images: list) -> dict:
        kwargs: dict = {}
        if images:
            proc = self.processor(images=images, return_tensors="pt")
            merge = self.config.vision_config.spatial_merge_size
            counts = [int(g.prod()) // merge**2 for g in proc["image_grid_thw"]]
            ids = expand_image_placeholders(ids, self.config.image_token_id, counts)
            kwargs.update(pixel_values=proc["pixel_values"], image_grid_thw=proc["image_grid_thw"])
        input_ids = torch.tensor([ids])
        if images and "mm_token_type_ids" in inspect.signature(self.model.model.get_rope_index).parameters:
            kwargs["mm_token_type_ids"] = (input_ids == self.config.image_token_id).int()
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **kwargs}

    @torch.inference_mode()
    def greedy(self, ids: list[int], images: list, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens (EOS ignored) and the logits [N, V] of each step."""
        inputs = self.inputs(ids, images)
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
        n = inputs["input_ids"].shape[1]
        return out.sequences[0, n:].tolist(), torch.cat(out.logits)


def arch_llm_fixture(archs: list[str]):
    """A module-scoped fixture giving (checkpoint path, `engine.LLM`) for each tiny checkpoint in `archs`."""

    @pytest.fixture(scope="module", params=archs)
    def arch_llm(request, tiny_checkpoint):
        path = tiny_checkpoint(request.param)
        llm = LLM(path, max_model_len=1024, num_gpu_blocks=256)
        yield path, llm
        llm.shutdown()

    return arch_llm


def assert_greedy_matches(llm: LLM, hf: HFReference, cases: dict, params: SamplingParams) -> None:
    """`cases` (name -> (prompt ids, images)), run in one batch, each equal to transformers' greedy run alone."""
    outs = llm.generate([{"prompt_token_ids": ids, "images": imgs} for ids, imgs in cases.values()], params)
    for name, out in zip(cases, outs):
        ref, _ = hf.greedy(*cases[name], max_new_tokens=params.max_tokens)
        assert out.token_ids == ref, name
        assert out.finish_reason == "length"


async def collect_aborting(engine, stream, after: int, abort: list[str]) -> list:
    """Every output of `stream`, aborting the requests `abort` once `after` outputs have come."""
    got = []
    async for out in stream:
        got.append(out)
        if len(got) == after:
            for request_id in abort:
                engine.abort(request_id)
    return got


def dummy_values_checkpoint(dummy_dir: Path, out: Path, seed: int) -> Path:
    """`dummy_dir` (config, tokenizer, preprocessor; no weights) copied to `out` plus a
    model.safetensors in transformers' key layout holding exactly what `load_format="dummy"`
    makes at TP=1 with `seed`: a checkpoint both our loader and transformers read (Qwen3-VL dense)."""
    import shutil

    from safetensors.torch import save_file

    from models.config import load_model_config
    from models.layers.parallel import SINGLE
    from models.random_weights import init_random_weights
    from models.registry import build_language_model, build_vision_model

    shutil.copytree(dummy_dir, out)
    config = load_model_config(out)
    decoder = build_language_model(config, SINGLE, torch.float32, "cpu")
    tower = build_vision_model(config, torch.float32, "cpu")
    init_random_weights(decoder, config.text.initializer_range, seed)
    init_random_weights(tower, config.vision.initializer_range, seed)
    text = config.text
    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    tensors: dict[str, torch.Tensor] = {}
    for name, p in decoder.named_parameters():
        key = "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
        if name.endswith("qkv_proj.weight"):
            parts = dict(zip(("q_proj", "k_proj", "v_proj"), p.split([q, kv, kv])))
        elif name.endswith("gate_up_proj.weight"):
            parts = dict(zip(("gate_proj", "up_proj"), p.chunk(2)))
        else:
            tensors[key] = p
            continue
        fused = key.split(".")[-2]
        tensors.update({key.replace(fused, sub): t for sub, t in parts.items()})
    for name, p in tower.named_parameters():
        if name == "patch_embed.proj.weight":  # transformers' Conv3d weight
            p = p.reshape(tower.patch_embed.conv_shape)
        tensors["model.visual." + name] = p
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    return out
