"""The offline API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`.

Prompts are `{"prompt": str}`, `{"prompt_token_ids": [...]}` or
`{"messages": [...]}` (OpenAI chat format; the chat template is applied), each
optionally with `"images"` (PIL images, paths or encoded bytes). Image parts
inside messages (`{"type": "image", "image": ...}` or `{"type": "image_url",
"image_url": {"url": "data:..." | path}}`) are used in order. The vision tower
runs here, per request; the engine gets its embeddings as `MultimodalInputs`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineDeadError, EngineInputError
from engine.positions import expand_image_placeholders
from engine.sampling_params import SamplingParams
from engine.sequence import MultimodalInputs, TokenLogprobs

Prompt = str | dict[str, Any]


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class GenerationOutput:
    """One prompt's result; `.token_ids` etc. are those of its first completion."""

    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def _image_from_part(part: dict[str, Any]) -> Any:
    if part.get("type") == "image_url" or "image_url" in part:
        ref = part["image_url"]
        url = ref["url"] if isinstance(ref, dict) else ref
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except (IndexError, ValueError) as exc:
                raise EngineInputError(f"bad data: URL ({exc})", param="messages") from exc
        if url.startswith("file://"):
            return Path(url[len("file://") :])
        if "://" in url:
            raise EngineInputError("the offline LLM does not fetch remote images", param="messages")
        return Path(url)
    return part["image"]


def _split_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with image parts reduced to `{"type": "image"}`, and the images in order."""
    images, out = [], []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") in ("image", "image_url") or "image" in part or "image_url" in part:
                    images.append(_image_from_part(part))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            msg = {**msg, "content": parts}
        out.append(msg)
    return out, images


class LLM:
    """Offline generation over an in-process `Engine` (Ray TP workers when tensor_parallel_size > 1)."""

    def __init__(
        self, model: str | Path, tensor_parallel_size: int = 1, device: str = "cpu",
        dtype: str = "float32", skip_tokenizer_init: bool = False, **engine_kwargs: Any,
    ):
        """`skip_tokenizer_init`: token ids in and out only (random-weight checkpoints have no
        tokenizer); outputs then have empty `.text` and text prompts are refused."""
        from transformers import AutoTokenizer

        config = EngineConfig(
            model=str(model), dtype=dtype, device=device,
            tensor_parallel_size=tensor_parallel_size, **engine_kwargs,
        )
        self.engine = Engine(config)
        self.model_config = self.engine.model_config
        self.tokenizer = None if skip_tokenizer_init else AutoTokenizer.from_pretrained(str(model))
        self._loop = asyncio.new_event_loop()
        self._ids = itertools.count()
        self.vision = self.processor = None
        from models.registry import build_vision_model, get_task

        if get_task(self.model_config).accepts_images:
            from models.loader import CheckpointReader
            from models.processor import ImageProcessor

            self.vision = build_vision_model(self.model_config, config.torch_dtype, self.engine.executor_device)
            self.vision.load_weights(CheckpointReader(str(model)))
            self.vision.eval()
            self.processor = ImageProcessor.from_pretrained(str(model))

    # ---- inputs ----------------------------------------------------------------

    def _tokens_and_images(self, prompt: Prompt) -> tuple[list[int], list[Any]]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        images = list(prompt.get("images") or [])
        if "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
        elif self.tokenizer is None:
            raise EngineInputError("skip_tokenizer_init is set: give 'prompt_token_ids'", param="prompt")
        elif "prompt" in prompt:
            ids = self.tokenizer.encode(prompt["prompt"], add_special_tokens=False)
        elif "messages" in prompt:
            messages, msg_images = _split_messages(prompt["messages"])
            if msg_images and images:
                raise EngineInputError("give images either in the messages or in 'images', not both", param="images")
            images = images or msg_images
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            raise EngineInputError("a prompt needs 'prompt', 'prompt_token_ids' or 'messages'", param="prompt")
        return ids, images

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any]) -> MultimodalInputs:
        """Preprocess and run the vision tower. Returns the embeddings the engine takes."""
        if self.vision is None:
            raise EngineInputError(f"{self.model_config.architecture} does not accept images", param="images")
        processed = self.processor.preprocess(list(images))
        embeds, deepstack = self.vision(processed.pixel_values, processed.grid_thw)
        return MultimodalInputs(
            image_embeds=embeds,
            deepstack_embeds=deepstack if deepstack.numel() else None,
            image_grid_thw=tuple(tuple(g) for g in processed.grid_thw.tolist()),
        )

    def prepare(self, prompt: Prompt) -> tuple[list[int], MultimodalInputs | None]:
        """Prompt -> (token ids with image placeholders expanded, vision inputs)."""
        ids, images = self._tokens_and_images(prompt)
        image_token = self.model_config.image_token_id
        if not images:
            return ids, None
        mm = self.encode_images(images)
        counts = mm.tokens_per_image(self.model_config.vision.spatial_merge_size)
        return expand_image_placeholders(ids, image_token, counts), mm

    # ---- generation --------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Generate for every prompt (n completions each); results in prompt order.

        Raises:
            EngineInputError: a bad prompt or sampling params (nothing runs).
            EngineDeadError: the engine failed while generating.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise EngineInputError("one SamplingParams per prompt, or a single one", param="sampling_params")
        prepared = [self.prepare(p) for p in prompts]
        return self._loop.run_until_complete(self._generate(prepared, params))

    async def _generate(self, prepared, params: list[SamplingParams]) -> list[GenerationOutput]:
        jobs = []
        for (ids, mm), sp in zip(prepared, params):
            for j in range(sp.n):
                seed = None if sp.seed is None else sp.seed + j
                one = dataclasses.replace(sp, n=1, seed=seed)
                jobs.append((f"llm-{next(self._ids)}", ids, mm, one))
        streams = []
        try:
            for request_id, ids, mm, sp in jobs:
                streams.append(self.engine.add_request(request_id, ids, mm, sp))
        except Exception:
            for s in streams:
                await s.aclose()
            raise
        results = await asyncio.gather(*(self._collect(s) for s in streams))
        outs, k = [], 0
        for (ids, _), sp in zip(prepared, params):
            completions = [dataclasses.replace(r, index=j) for j, r in enumerate(results[k : k + sp.n])]
            outs.append(GenerationOutput(ids, completions))
            k += sp.n
        return outs

    async def _collect(self, stream) -> CompletionOutput:
        tokens, logprobs, reason, error = [], [], None, None
        async for out in stream:
            tokens.extend(out.new_token_ids)
            if out.logprobs:
                logprobs.extend(out.logprobs)
            reason, error = out.finish_reason, out.error
        if reason == "error":
            raise EngineDeadError(error or "the engine failed")
        text = "" if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=True)
        return CompletionOutput(0, tokens, text, logprobs or None, reason)

    def shutdown(self) -> None:
        """Stop the engine (and its workers); the LLM is unusable afterwards."""
        if self._loop.is_closed():
            return
        self.engine.shutdown()
        self._loop.run_until_complete(asyncio.sleep(0))  # deliver what the engine emitted last
        self._loop.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
