"""A request's image embeddings -> the engine's `MultimodalInputs`, in the replica or in its engine process.

In process (`engine.Engine`) the replica reads every embedding itself (`merge_images`
over `embedding_pool.read_embeddings`). With `llm.engine_process` the replica holds no
CUDA context: it forwards what the encoder returned (`PendingImages`: CUDA IPC handles
unopened, object-store tensors through shared memory) and the engine process reads them
with its own `PoolReader` (`EmbeddingOpener`, given to `EngineProcess` at start-up), under
the same slot rules: a slot is marked done once copied, the rest released after a failed read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deployments.embedding_pool import PoolReader, read_embeddings
from deployments.embedding_transfer import ImageEmbedding, IpcEmbedding
from engine.multimodal import VisionItem, frame_groups, multimodal_inputs
from engine.sequence import MultimodalInputs


def merge_images(embeddings: list[ImageEmbedding], hashes: tuple[str, ...] | None = None) -> MultimodalInputs:
    """Per-image and per-video encoder outputs (in prompt order) -> one request's multimodal inputs.

    A video of grid (t, h, w) becomes its t frame groups, one per placeholder span
    (`engine/multimodal.py`). Shapes: image_embeds [sum N_tok, H];
    deepstack_embeds [L, sum N_tok, H] or None.
    """
    keys = hashes if hashes is not None else (None,) * len(embeddings)
    items = [g for e, key in zip(embeddings, keys, strict=True)
             for g in frame_groups(VisionItem(e.embeds, e.deepstack, tuple(e.grid_thw), key))]
    return multimodal_inputs(items)


@dataclass(frozen=True, slots=True)
class PendingImages:
    """One request's embeddings as the encoder returned them, for the engine process to read
    (an `engine.core.DeferredInputs`). `hashes`: the images' content ids (prefix-cache keys)."""

    items: tuple[ImageEmbedding | IpcEmbedding, ...]
    hashes: tuple[str, ...] | None

    def placeholder(self) -> MultimodalInputs:
        """The merged inputs' shapes as meta tensors: what the replica validates."""
        meta = [ImageEmbedding(torch.empty(i.embeds_shape, device="meta"),
                               torch.empty(i.deepstack_shape, device="meta"), tuple(i.grid_thw))
                if isinstance(i, IpcEmbedding) else
                ImageEmbedding(i.embeds.to("meta"), i.deepstack.to("meta"), tuple(i.grid_thw)) for i in self.items]
        # Content ids only key the prefix cache; the engine process derives the real ones.
        return merge_images(meta, self.hashes or tuple(f"unhashed-{k}" for k in range(len(meta))))

    def __reduce__(self):
        # Object-store tensors as plain tensors: the engine pipe's pickler moves them through shared
        # memory (ImageEmbedding's own reduction would copy them into the message as NumPy bytes).
        items = tuple((i.embeds, i.deepstack, tuple(i.grid_thw)) if isinstance(i, ImageEmbedding) else i
                      for i in self.items)
        return _rebuild_pending_images, (items, self.hashes)


def _rebuild_pending_images(items: tuple, hashes: tuple[str, ...] | None) -> PendingImages:
    return PendingImages(tuple(ImageEmbedding(*i) if isinstance(i, tuple) else i for i in items), hashes)


class EmbeddingOpener:
    """Reads `PendingImages` in the engine process (picklable: its `PoolReader` is made there, on first use).

    Args:
        node_id: the replica's Ray node (IPC handles of other nodes are refused).
        device: "cuda" (IPC slots are copied to this process' current GPU) or "cpu" (no IPC).
    """

    def __init__(self, node_id: str, device: str):
        self.node_id, self.device = node_id, device
        self._reader: PoolReader | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "device": self.device}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["node_id"], state["device"])

    def __call__(self, pending: PendingImages) -> MultimodalInputs:
        """Raises EncoderUnavailableError when a slot cannot be read here (reused, another GPU)."""
        if self._reader is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else None
            self._reader = PoolReader(self.node_id, device)
        return merge_images(read_embeddings(list(pending.items), self._reader), pending.hashes)
