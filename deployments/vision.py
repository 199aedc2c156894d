"""The VisionEncoder deployment: the ViT alone, batched across concurrent requests.

Loads only `model.visual.*`. `encode` takes one image as the router resized it
(uint8 pixels: the router decodes and resizes, this replica rescales, normalizes
and patchifies on its device), or one video as its sampled, resized frames; `@serve.batch` gathers images from concurrent
requests into one tower call and splits the outputs back by each image's grid. Results are CPU tensors (so
they can travel through Ray's object store to any LLM replica); they pickle as
NumPy arrays so the LLM replica maps them from the store without a copy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve

from deployments.config import AppConfig, ensure_checkpoint, resolve_dtype
from deployments.metrics import BATCH_SIZE_BUCKETS, MetricsRecorder
from engine.transport import dtype_name, from_numpy, to_numpy
from models.processor import ImageProcessor
from models.video_processor import VideoProcessor


@dataclass(frozen=True, slots=True)
class ImageEmbedding:
    """Vision-tower output of one image.

    Shapes: embeds [N_tok, H]; deepstack [L, N_tok, H] (L may be 0);
    grid_thw (t, h, w) in patches.
    """

    embeds: torch.Tensor
    deepstack: torch.Tensor
    grid_thw: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[0]

    def __reduce__(self):
        # NumPy buffers: the LLM replica maps them out of the object store (engine/transport.py).
        return _rebuild_image_embedding, (to_numpy(self.embeds), to_numpy(self.deepstack),
                                          dtype_name(self.embeds), self.grid_thw)


def _rebuild_image_embedding(embeds: Any, deepstack: Any, dtype: str, grid_thw: tuple[int, int, int]) -> ImageEmbedding:
    return ImageEmbedding(from_numpy(embeds, dtype), from_numpy(deepstack, dtype), tuple(grid_thw))


def split_outputs(
    embeds: torch.Tensor, deepstack: torch.Tensor, grids: list[tuple[int, int, int]], merge_unit: int
) -> list[ImageEmbedding]:
    """Split a batched tower output back into per-image CPU results.

    Shapes: embeds [sum N_tok, H]; deepstack [L, sum N_tok, H].
    """
    sizes = [t * h * w // merge_unit for t, h, w in grids]
    embeds = embeds.cpu()
    deepstack = deepstack.cpu()
    if len(sizes) == 1:  # the whole output is the one image's: no per-image copy
        return [ImageEmbedding(embeds=embeds, deepstack=deepstack, grid_thw=grids[0])]
    out, offset = [], 0
    for size, grid in zip(sizes, grids, strict=True):
        out.append(ImageEmbedding(
            embeds=embeds[offset : offset + size].clone(),
            deepstack=deepstack[:, offset : offset + size].clone(),
            grid_thw=grid,
        ))
        offset += size
    return out


class VisionEncoder:
    """Serve deployment body: one replicated vision tower."""

    def __init__(self, app_config: dict[str, Any]):
        from models.config import load_model_config
        from models.registry import build_vision_model

        config = AppConfig.model_validate(app_config)
        path = ensure_checkpoint(config)
        model_config = load_model_config(path)
        # Ray hands a GPU to this replica only when it asked for one.
        self.device = "cuda" if config.vision.num_gpus > 0 and config.device != "cpu" else "cpu"
        dtype = getattr(torch, resolve_dtype(config.dtype, self.device))
        self.model = build_vision_model(model_config, dtype, self.device)
        self.model.load_weights(_checkpoint_reader(path))
        self.processor = ImageProcessor.from_pretrained(path)
        self.video_processor = VideoProcessor.from_pretrained(path)
        self.merge_unit = model_config.vision.spatial_merge_size**2
        self.encode.set_max_batch_size(config.vision.max_batch_size)
        self.encode.set_batch_wait_timeout_s(config.vision.batch_wait_timeout_s)
        self.metrics = MetricsRecorder.for_replica("VisionEncoder")
        self.images_processed = 0

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """One image per call (`ImageProcessor.resize`'s uint8 [H, W, 3]); Serve hands this method a batch of calls."""
        self.metrics.start_pushing()
        start = time.monotonic()
        results = await asyncio.to_thread(self._run, images)
        self.images_processed += len(images)
        self.metrics.inc("splitvl_vision_images_total", len(images))
        self.metrics.inc("splitvl_vision_batches_total")
        self.metrics.observe("splitvl_vision_batch_size", len(images), buckets=BATCH_SIZE_BUCKETS)
        self.metrics.observe("splitvl_vision_encode_seconds", time.monotonic() - start)
        return results

    def _run(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        # Images [H, W, 3] and videos [T, h, w, 3] (sampled, resized frames) share one tower call.
        with torch.inference_mode():
            parts = [(self.video_processor if item.ndim == 4 else self.processor).pixel_values([item], self.device)
                     for item in images]
            grid_thw = torch.cat([p.grid_thw for p in parts])
            embeds, deepstack = self.model(torch.cat([p.pixel_values for p in parts]), grid_thw)
        grids = [tuple(int(v) for v in g) for g in grid_thw]
        return split_outputs(embeds, deepstack, grids, self.merge_unit)

    def stats(self) -> dict[str, int]:
        return {"images_processed": self.images_processed}


def _checkpoint_reader(path: Any) -> Any:
    from models.loader import CheckpointReader

    return CheckpointReader(path)
