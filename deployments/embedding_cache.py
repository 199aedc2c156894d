"""Content-addressed cache of vision-encoder outputs, holding references only.

Values are Ray `ObjectRef`s to what a VisionEncoder replica returned: the
object store keeps the embedding bytes, the router keeps a pointer and the
size it stands for. LRU, bounded by those sizes in bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from engine.multimodal import content_digest


@dataclass(frozen=True, slots=True)
class CacheEntry:
    ref: Any  # ray.ObjectRef of an ImageEmbedding
    nbytes: int


class EmbeddingCache:
    """LRU of `key -> ObjectRef`, at most `capacity_bytes` of referenced embeddings."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        """Whether `key` is cached, without counting as a use (safe to ask from another thread)."""
        return key in self._entries

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.ref

    def put(self, key: str, ref: Any, nbytes: int) -> None:
        if nbytes > self.capacity_bytes:
            return
        self.pop(key)
        self._entries[key] = CacheEntry(ref, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def pop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def values(self) -> list[Any]:
        return [e.ref for e in self._entries.values()]


def video_key(frames: Any, settings: str, model_id: str) -> str:
    """Content key of a video's sampled, resized uint8 frames ([T, h, w, 3] tensor), the settings and model."""
    return content_digest(f"{model_id}\0{settings}\0video\0{tuple(frames.shape)}\0", frames.contiguous().numpy())


def image_key(image: PIL.Image.Image, settings: str, model_id: str) -> str:
    """Content key of the decoded RGB pixels, their size, the preprocessing settings and model."""
    return pixels_key(np.asarray(image), image.mode, settings, model_id)


def pixels_key(pixels: np.ndarray, mode: str, settings: str, model_id: str) -> str:
    """`image_key` of the image whose pixels are `pixels` ([H, W, C] uint8, `np.asarray` of it), hashed in place."""
    height, width = pixels.shape[:2]
    return content_digest(f"{model_id}\0{settings}\0{mode}\0{width}x{height}\0", pixels)
