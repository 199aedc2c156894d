"""The VisionEncoder deployment: the ViT alone, batched across concurrent requests.

Loads only `model.visual.*`. `encode` takes one image as the router resized it
(uint8 pixels: the router decodes and resizes, this replica rescales, normalizes
and patchifies on its device), or one video as its sampled, resized frames; an `EncodeBatcher` gathers the images of concurrent
requests into one tower call (at once when the tower is idle, else every image queued during the
call before) and splits the outputs back by each image's grid. On a GPU with
`embedding_transfer: auto` each image's outputs go into a slot of this replica's `EmbeddingPool`
and the call returns an `IpcEmbedding` handle (LLM replicas on this node copy GPU -> GPU);
otherwise, on a retry that asked for the object store, or when the pool is full, the result is an
`ImageEmbedding` of CPU tensors that travels through Ray's object store to any LLM replica
(`deployments/embedding_transfer.py`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import torch

from deployments.config import AppConfig
from deployments.metrics import BATCH_SIZE_BUCKETS, MetricsRecorder
from deployments.embedding_pool import EmbeddingPool
from deployments.embedding_transfer import ImageEmbedding, IpcEmbedding
from deployments.encode_batcher import EncodeBatcher
from deployments.vision_tower import VisionTower, split_outputs
from engine.log_setup import configure_logging
from engine.timeline import EncodeRecord, Timeline, TimelineRead

__all__ = ["ImageEmbedding", "VisionEncoder", "split_outputs"]


class VisionEncoder:
    """Serve deployment body: one replicated vision tower; or, `in_process`, an LLM replica's own tower.

    In process (`vision.colocate_llm`: the ingress replica that owns the engine builds it) the tower runs
    on the replica's device, on a CUDA stream of its own (the engine steps on a high-priority one), and
    `encode` returns `ImageEmbedding`s of device tensors, finished (the stream synchronized) and never
    copied: no pool, no transfer. `metrics`: the owning replica's recorder.
    """

    def __init__(self, app_config: dict[str, Any], in_process: bool = False,
                 metrics: MetricsRecorder | None = None):
        configure_logging()
        config = AppConfig.model_validate(app_config)
        # Ray hands a GPU to this replica only when it asked for one; in process, the LLM replica's.
        gpu = config.resolved_device() == "cuda" if in_process else config.vision.num_gpus > 0 and config.device != "cpu"
        self.device = "cuda" if gpu else "cpu"
        self.in_process = in_process
        self.tower = VisionTower(config, self.device, stream=in_process)
        self.model, self.stream = self.tower.model, self.tower.stream
        self._batcher: EncodeBatcher[tuple[np.ndarray, str], ImageEmbedding | IpcEmbedding] = EncodeBatcher(
            self._encode_batch, config.vision.max_batch_size, config.vision.batch_wait_timeout_s)
        self.metrics = metrics if metrics is not None else MetricsRecorder.for_replica("VisionEncoder")
        self.images_processed = 0
        self.pool = None if in_process else _make_pool(config, self.device)
        self._timeline: Timeline[EncodeRecord] = Timeline()

    async def encode(self, image: np.ndarray, transfer: str) -> ImageEmbedding | IpcEmbedding:
        """One image per call (`ImageProcessor.resize`'s uint8 [H, W, 3], or a video's frames [T, h, w, 3])
        and how its result should travel ("auto" or "object_store"); batched with concurrent calls."""
        return await self._batcher((image, transfer))

    async def _encode_batch(self, calls: list[tuple[np.ndarray, str]]) -> list[ImageEmbedding | IpcEmbedding]:
        self.metrics.start_pushing()
        images, transfers = [image for image, _ in calls], [transfer for _, transfer in calls]
        start = time.monotonic()
        results = await asyncio.to_thread(self._run, images, transfers)
        self.images_processed += len(images)
        observe_encode(self.metrics, len(images), time.monotonic() - start)
        return results

    def _run(self, images: list[np.ndarray], transfers: list[str]) -> list[ImageEmbedding | IpcEmbedding]:
        start = time.monotonic()
        if self.stream is None:
            out, rows = self._encode_images(images, transfers)
        else:
            with torch.cuda.stream(self.stream):
                out, rows = self._encode_images(images, transfers)
            self.stream.synchronize()
        self._timeline.append(EncodeRecord(start, time.monotonic(), len(images), rows))
        return out

    def _encode_images(self, images: list[np.ndarray], transfers: list[str]) -> tuple[list[Any], int]:
        """(one result per image, patch rows encoded). The results are finished on the device, except
        in process on a stream of its own (the caller synchronizes it)."""
        # Images [H, W, 3] and videos [T, h, w, 3] (sampled, resized frames) share one tower call.
        embeds, deepstack, grids = self.tower.run(images)
        merge_unit = self.tower.merge_unit
        with torch.inference_mode():
            if self.in_process:
                out = split_outputs(embeds, deepstack, grids, merge_unit, to_host=False)
            elif self.pool is None or all(t == "object_store" for t in transfers):
                out = split_outputs(embeds, deepstack, grids, merge_unit)
            else:
                out = self._to_pool(embeds, deepstack, grids, transfers)
        # The host and pool paths end after the device finished (the copy to host, the pool's synchronize).
        return out, self.tower.patches(grids)

    def _to_pool(self, embeds: torch.Tensor, deepstack: torch.Tensor, grids: list[tuple[int, int, int]],
                 transfers: list[str]) -> list[ImageEmbedding | IpcEmbedding]:
        """Each image into a pool slot; those that asked for the object store or found the pool full go to host.

        Shapes: embeds [sum N_tok, H]; deepstack [L, sum N_tok, H].
        """
        out: list[ImageEmbedding | IpcEmbedding | None] = []
        offset = 0
        for grid, transfer in zip(grids, transfers, strict=True):
            size = grid[0] * grid[1] * grid[2] // self.tower.merge_unit
            e, d = embeds[offset : offset + size], deepstack[:, offset : offset + size]
            out.append(self.pool.store(e, d, grid) if transfer == "auto" else None)
            offset += size
        torch.cuda.current_stream().synchronize()  # the slots are written before any handle leaves
        if all(item is not None for item in out):
            self.metrics.inc("splitvl_vision_ipc_images_total", len(out))
            return out
        host = split_outputs(embeds, deepstack, grids, self.tower.merge_unit)
        self.metrics.inc("splitvl_vision_ipc_images_total", sum(item is not None for item in out))
        return [item if item is not None else h for item, h in zip(out, host, strict=True)]

    def stats(self) -> dict[str, int]:
        return {"images_processed": self.images_processed}

    def timeline(self, since: int = 0) -> TimelineRead[EncodeRecord]:
        """This replica's tower calls from cursor `since` on (engine/timeline.py)."""
        return self._timeline.read(since)


def observe_encode(metrics: MetricsRecorder, images: int, seconds: float) -> None:
    """The `splitvl_vision_*` metrics of one tower call over `images` images that took `seconds`."""
    metrics.inc("splitvl_vision_images_total", images)
    metrics.inc("splitvl_vision_batches_total")
    metrics.observe("splitvl_vision_batch_size", images, buckets=BATCH_SIZE_BUCKETS)
    metrics.observe("splitvl_vision_encode_seconds", seconds)


def _make_pool(config: AppConfig, device: str) -> EmbeddingPool | None:
    """This replica's IPC pool: on a GPU with `embedding_transfer: auto`, else None (object store only)."""
    vision = config.vision
    if device != "cuda" or vision.embedding_transfer != "auto" or vision.embedding_pool_mb == 0:
        return None
    import ray

    return EmbeddingPool.on_device(vision.embedding_pool_mb * 2**20, torch.device("cuda", torch.cuda.current_device()),
                                   ray.get_runtime_context().get_node_id(), vision.embedding_lease_s)

