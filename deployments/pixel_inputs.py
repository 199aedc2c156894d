"""`vision.colocate_llm` with `llm.engine_process`: the vision tower runs in the engine process.

The router preprocesses as always (decode, resize, hash) and its embedding cache keeps an
`ImagePixels` per image: the resized uint8 pixels as a CPU tensor (they reach the engine
process through shared memory), the patch grid, the content hash and the embeddings' shapes.
`LLMServer` hands a request's as one `PixelInputs` (an `engine.core.DeferredInputs`: its
`placeholder()` is what the replica validates) to the engine process, whose encoder thread
(`engine/core/encoding.py`) runs them through `PixelEncoder`: the tower on the engine's
device, on a CUDA stream of its own (the engine steps on a high-priority one), with the
embeddings of recent images kept on the device by hash, so a repeated image is not encoded
again. No tower in the replica, no embedding transfer.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deployments.config import AppConfig
from deployments.embedding_cache import EmbeddingCache
from deployments.embedding_transfer import ImageEmbedding
from deployments.image_inputs import merge_images
from deployments.vision_tower import VisionTower, split_outputs
from engine.sequence import MultimodalInputs
from engine.timeline import EncodeRecord
from models.config import ModelConfig

Grid = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class ImagePixels:
    """One image or video as the router resized it, to be encoded by the engine process' tower.

    Shapes: pixels [H, W, 3] (an image) or [T, h, w, 3] (a video's sampled frames), uint8;
    grid_thw (t, h, w) in patches; embeds_shape (N_tok, H); deepstack_shape (L, N_tok, H).
    """

    pixels: torch.Tensor
    grid_thw: Grid
    key: str  # content hash: the router's cache key, the engine process' too
    embeds_shape: tuple[int, int]
    deepstack_shape: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.embeds_shape[0]

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes


class EngineTower:
    """The router's side of the engine process' tower: an image's encode is its `ImagePixels`."""

    def __init__(self, model_config: ModelConfig):
        vision = model_config.vision
        self.hidden = vision.out_hidden_size
        self.levels = len(vision.deepstack_visual_indexes)
        self.merge_unit = vision.spatial_merge_size**2

    def pixels(self, pixels: np.ndarray, grid_thw: Grid, key: str) -> ImagePixels:
        """`pixels` (resized, at `grid_thw`'s size) as the record the engine process encodes."""
        tokens = grid_thw[0] * grid_thw[1] * grid_thw[2] // self.merge_unit
        return ImagePixels(torch.from_numpy(np.ascontiguousarray(pixels)), tuple(grid_thw), key,
                           (tokens, self.hidden), (self.levels, tokens, self.hidden))


@dataclass(frozen=True, slots=True)
class PixelInputs:
    """One request's images, in prompt order, for the engine process' tower (an `engine.core.DeferredInputs`)."""

    items: tuple[ImagePixels, ...]

    def placeholder(self) -> MultimodalInputs:
        """The merged embeddings' shapes as meta tensors, with the images' hashes: what the replica validates."""
        meta = [ImageEmbedding(torch.empty(i.embeds_shape, device="meta"),
                               torch.empty(i.deepstack_shape, device="meta"), i.grid_thw) for i in self.items]
        return merge_images(meta, tuple(i.key for i in self.items))


class PixelEncoder:
    """Encodes `PixelInputs` in the engine process (an `engine.core.InputEncoder`).

    Picklable: built in the replica, `load`ed in the engine process (the tower on `device`, "cpu" or
    that process' current GPU, in the app's dtype; the device cache bounded by `embedding_cache_bytes`).
    """

    def __init__(self, app_config: dict[str, Any], device: str):
        self.app_config, self.device = app_config, device
        self.max_batch_size = AppConfig.model_validate(app_config).vision.max_batch_size
        self._tower: VisionTower | None = None
        self._cache: EmbeddingCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"app_config": self.app_config, "device": self.device}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["app_config"], state["device"])

    def load(self) -> None:
        config = AppConfig.model_validate(self.app_config)
        self._tower = VisionTower(config, self.device, stream=True)
        self._cache = EmbeddingCache(config.embedding_cache_bytes)

    def accepts(self, mm: Any) -> bool:
        return isinstance(mm, PixelInputs)

    def count(self, mm: PixelInputs) -> int:
        return len(mm.items)

    def encode(self, batch: list[PixelInputs]) -> tuple[list[MultimodalInputs], EncodeRecord | None]:
        """Each request's inputs, finished on the device; the images not cached here go through one
        tower call, whose record comes back too (None: every image was cached).

        Raises:
            ValueError: an image's grid is not the one the replica validated its request with.
            Exception: whatever the tower raised (out of memory, ...); nothing is cached then.
        """
        found: dict[str, ImageEmbedding] = {}
        todo: dict[str, ImagePixels] = {}
        for item in (i for mm in batch for i in mm.items):
            cached = self._cache.get(item.key) if item.key not in found else None
            if cached is not None:
                found[item.key] = cached
            elif item.key not in found:
                todo[item.key] = item
        start = time.monotonic()
        stream = self._tower.stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            new = self._run(list(todo.values())) if todo else []
            found.update(zip(todo, new))
            with torch.inference_mode():
                merged = [merge_images([found[i.key] for i in mm.items], tuple(i.key for i in mm.items))
                          for mm in batch]
        if stream is not None:
            stream.synchronize()  # finished before the engine's stream reads them
        for key, embedding in zip(todo, new):
            self._cache.put(key, embedding, embedding.embeds.nbytes + embedding.deepstack.nbytes)
        record = None
        if todo:
            record = EncodeRecord(start, time.monotonic(), len(todo),
                                  self._tower.patches([i.grid_thw for i in todo.values()]))
        return merged, record

    def _run(self, items: list[ImagePixels]) -> list[ImageEmbedding]:
        """One tower call over `items`, split per image, on the device (on the current stream)."""
        embeds, deepstack, grids = self._tower.run([i.pixels for i in items])
        for item, grid in zip(items, grids, strict=True):
            if grid != item.grid_thw:
                raise ValueError(f"an image of {tuple(item.pixels.shape)} pixels has the patch grid {grid}, "
                                 f"not the {item.grid_thw} its request was validated with")
        with torch.inference_mode():
            return split_outputs(embeds, deepstack, grids, self._tower.merge_unit, to_host=False)
