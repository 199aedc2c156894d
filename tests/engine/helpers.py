"""Shared helpers for the engine tests: prompts, images, transformers references."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import PIL.Image
import torch

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
