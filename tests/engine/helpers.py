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
