"""The vision tower of a checkpoint with its preprocessors, on one device.

Resized uint8 images ([H, W, 3]) and videos' sampled frames ([T, h, w, 3]) in, the tower's
batched outputs out. Built by the VisionEncoder deployment and by the engine process' own
tower (`vision.colocate_llm` with `llm.engine_process`, `deployments/pixel_inputs.py`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from deployments.config import AppConfig, ensure_checkpoint, resolve_dtype
from deployments.embedding_transfer import ImageEmbedding
from models.processor import ImageProcessor
from models.video_processor import VideoProcessor

Grid = tuple[int, int, int]

log = logging.getLogger(__name__)


class VisionTower:
    """`model.visual.*` of the checkpoint on `device` ("cpu" or "cuda"), in the app's dtype.

    `stream`: on a GPU, run on a CUDA stream of its own (the caller synchronizes it).
    """

    def __init__(self, config: AppConfig, device: str, stream: bool = False):
        from models.config import load_model_config
        from models.loader import fill_weights, weight_bytes
        from models.registry import build_vision_model

        path = ensure_checkpoint(config)
        model_config = load_model_config(path)
        self.device = device
        self.stream = torch.cuda.Stream() if stream and device == "cuda" else None
        dtype = getattr(torch, resolve_dtype(config.dtype, device))
        began = time.perf_counter()
        self.model = build_vision_model(model_config, dtype, device)
        fill_weights(self.model, path, config.vision.load_format, model_config.vision.initializer_range, config.seed)
        log.info("vision tower weights (%s, %.2f GiB) on %s in %.1f s", config.vision.load_format,
                 weight_bytes(self.model) / 2**30, device, time.perf_counter() - began)
        self.processor = ImageProcessor.from_pretrained(path)
        self.video_processor = VideoProcessor.from_pretrained(path)
        self.merge_unit = model_config.vision.spatial_merge_size**2

    def run(self, items: list[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[Grid]]:
        """One tower call over every item: (embeds, deepstack, grid of each item), in inference mode on the
        current stream, not synchronized.

        Shapes: items [H, W, 3] or [T, h, w, 3] uint8; embeds [sum N_tok, H_out];
        deepstack [L, sum N_tok, H_out].
        """
        with torch.inference_mode():
            parts = [(self.video_processor if item.ndim == 4 else self.processor).pixel_values([item], self.device)
                     for item in items]
            grid_thw = torch.cat([p.grid_thw for p in parts])
            embeds, deepstack = self.model(torch.cat([p.pixel_values for p in parts]), grid_thw)
        return embeds, deepstack, [tuple(int(v) for v in g) for g in grid_thw]

    def patches(self, grids: list[tuple[int, int, int]]) -> int:
        """Tower rows of a call over items of these grids."""
        return sum(t * h * w for t, h, w in grids)


def split_outputs(
    embeds: torch.Tensor, deepstack: torch.Tensor, grids: list[tuple[int, int, int]], merge_unit: int,
    to_host: bool = True,
) -> list[ImageEmbedding]:
    """Split a batched tower output back into per-image results, CPU tensors (`to_host`) or where they are.

    Shapes: embeds [sum N_tok, H]; deepstack [L, sum N_tok, H].
    """
    sizes = [t * h * w // merge_unit for t, h, w in grids]
    if to_host:
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
