"""The offline API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`.

Prompts are `{"prompt": str}`, `{"prompt_token_ids": [...]}` or
`{"messages": [...]}` (OpenAI chat format; the chat template is applied), each
optionally with `"images"` (PIL images, paths or encoded bytes) and `"videos"`
(paths or encoded bytes; text prompts only, as their timestamps are text).
Image and video parts inside messages (`{"type": "image", "image": ...}`,
`{"type": "image_url", "image_url": {"url": "data:..." | path}}`, and the same
with `video`) are used in order. The vision tower runs here, per request; the
engine gets its embeddings as `MultimodalInputs`.
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
from engine.multimodal import VisionItem, in_prompt_order, multimodal_inputs, pixels_digest
from engine.positions import expand_image_placeholders
from engine.sampling_params import SamplingParams
from engine.sequence import MultimodalInputs, TokenLogprobs
from models.video_io import PreparedVideo, prepare_video
from models.video_processor import VideoError, expand_video_wrappers, video_prompt

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


def _media_from_part(part: dict[str, Any], kind: str) -> Any:
    """`kind` is "image" or "video"."""
    if part.get("type") == f"{kind}_url" or f"{kind}_url" in part:
        ref = part[f"{kind}_url"]
        url = ref["url"] if isinstance(ref, dict) else ref
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except (IndexError, ValueError) as exc:
                raise EngineInputError(f"bad data: URL ({exc})", param="messages") from exc
        if url.startswith("file://"):
            return Path(url[len("file://") :])
        if "://" in url:
            raise EngineInputError(f"the offline LLM does not fetch remote {kind}s", param="messages")
        return Path(url)
    return part[kind]


def _part_kind(part: dict[str, Any]) -> str | None:
    for kind in ("image", "video"):
        if part.get("type") in (kind, f"{kind}_url") or kind in part or f"{kind}_url" in part:
            return kind
    return None


def _split_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """Messages with media parts reduced to `{"type": "image" | "video"}`, and the media in order."""
    media: dict[str, list[Any]] = {"image": [], "video": []}
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = _part_kind(part)
                if kind is None:
                    parts.append(part)
                    continue
                media[kind].append(_media_from_part(part, kind))
                parts.append({"type": kind})
            msg = {**msg, "content": parts}
        out.append(msg)
    return out, media


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
        self.vision = self.processor = self.video_processor = None
        from models.registry import build_vision_model, get_task

        if get_task(self.model_config).accepts_images:
            from models.loader import fill_weights
            from models.processor import ImageProcessor
            from models.video_processor import VideoProcessor

            self.vision = build_vision_model(self.model_config, config.torch_dtype, self.engine.executor_device)
            fill_weights(self.vision, str(model), config.load_format, self.model_config.vision.initializer_range,
                         config.seed)
            self.vision.eval()
            self.processor = ImageProcessor.from_pretrained(str(model))
            self.video_processor = VideoProcessor.from_pretrained(str(model))

    # ---- inputs ----------------------------------------------------------------

    def _text_and_media(self, prompt: Prompt) -> tuple[str | None, list[int] | None, list[Any], list[Any]]:
        """(text or None, token ids or None, images, videos) of a prompt."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        images, videos = list(prompt.get("images") or []), list(prompt.get("videos") or [])
        if "prompt_token_ids" in prompt:
            if videos:
                raise EngineInputError("videos need a text prompt or messages (timestamps are text)", param="videos")
            return None, [int(t) for t in prompt["prompt_token_ids"]], images, videos
        if self.tokenizer is None:
            raise EngineInputError("skip_tokenizer_init is set: give 'prompt_token_ids'", param="prompt")
        if "prompt" in prompt:
            return prompt["prompt"], None, images, videos
        if "messages" not in prompt:
            raise EngineInputError("a prompt needs 'prompt', 'prompt_token_ids' or 'messages'", param="prompt")
        messages, media = _split_messages(prompt["messages"])
        if (media["image"] and images) or (media["video"] and videos):
            raise EngineInputError("give media either in the messages or in 'images'/'videos', not both", param="images")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, None, images or media["image"], videos or media["video"]

    def _require_vision(self) -> None:
        if self.vision is None:
            raise EngineInputError(f"{self.model_config.architecture} does not accept images or videos", param="images")

    @torch.inference_mode()
    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[VisionItem]:
        """Run the vision tower; one item per row of `grid_thw`."""
        embeds, deepstack = self.vision(pixel_values, grid_thw)
        merge = self.model_config.vision.spatial_merge_size
        items, row = [], 0
        for t, h, w in grid_thw.tolist():
            n = t * h * w // merge**2
            deep = deepstack[:, row : row + n] if deepstack.numel() else None
            items.append(VisionItem(embeds[row : row + n], deep, (t, h, w)))
            row += n
        return items

    def encode_images(self, images: Sequence[Any]) -> MultimodalInputs:
        """Preprocess and run the vision tower. Returns the embeddings the engine takes."""
        self._require_vision()
        return multimodal_inputs(self._image_items(list(images)))

    def _prepare_videos(self, videos: list[Any]) -> list[PreparedVideo]:
        self._require_vision()
        try:
            return [prepare_video(Path(v).read_bytes() if isinstance(v, (str, Path)) else bytes(v),
                                  self.video_processor) for v in videos]
        except (VideoError, OSError) as exc:
            raise EngineInputError(f"cannot use the video: {exc}", param="videos") from exc

    def prepare(self, prompt: Prompt) -> tuple[list[int], MultimodalInputs | None]:
        """Prompt -> (token ids with image and video placeholders expanded, vision inputs)."""
        text, ids, images, videos = self._text_and_media(prompt)
        prepared = self._prepare_videos(videos) if videos else []
        if prepared:
            vp = self.video_processor
            try:
                text = expand_video_wrappers(text, [
                    video_prompt(v.timestamps, vp.tokens_per_frame_group(v.grid_thw), "<|vision_start|>",
                                 "<|video_pad|>", "<|vision_end|>", pads=1)
                    for v in prepared])
            except VideoError as exc:
                raise EngineInputError(str(exc), param="videos") from exc
        if ids is None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not images and not prepared:
            return ids, None
        self._require_vision()
        image_items = self._image_items(images) if images else []
        video_items = []
        if prepared:
            pv = self.video_processor.pixel_values([v.resized for v in prepared], self.engine.executor_device)
            video_items = self._encode(pv.pixel_values, pv.grid_thw)
        cfg = self.model_config
        items = in_prompt_order(ids, cfg.image_token_id, cfg.video_token_id, image_items, video_items)
        counts = [t * h * w // cfg.vision.spatial_merge_size**2 for t, h, w in (i.grid_thw for i in items)]
        return expand_image_placeholders(ids, cfg.placeholder_token_ids, counts), multimodal_inputs(items)

    def _image_pixels(self, images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and resize on the host, then rescale, normalize and patchify on the tower's device
        (only the uint8 pixels are copied there; the same values as `preprocess`, bit for bit)."""
        return self._device_pixels([self.processor.resize(image) for image in images])

    def _device_pixels(self, resized: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        processed = self.processor.pixel_values(resized, self.engine.executor_device)
        return processed.pixel_values, processed.grid_thw

    def _image_items(self, images: list[Any]) -> list[VisionItem]:
        """`_image_pixels` through the tower, each item keyed by its pixels (the prefix cache's key)."""
        resized = [self.processor.resize(image) for image in images]
        items = self._encode(*self._device_pixels(resized))
        return [dataclasses.replace(item, content_hash=pixels_digest(pixels)) for item, pixels in zip(items, resized)]

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
        # All at once: the engine's first batches then do not depend on when its step thread wakes.
        streams = self.engine.add_requests(jobs)
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
