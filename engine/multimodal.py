"""One request's vision items (images and video frame groups) in prompt order.

The vision encoder returns one embedding per image and per video (a video of
grid (t, h, w) as `t * h * w / merge**2` rows, frame group by frame group). The
prompt holds one placeholder span per image and per frame group (a video's
groups are separated by timestamp text), so a video becomes `t` items of grid
(1, h, w); items are ordered by their placeholders in the prompt, which is how
transformers' Qwen3-VL fills image and video tokens and their deepstack rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.errors import EngineInputError
from engine.sequence import GridTHW, MultimodalInputs


@dataclass(frozen=True, slots=True)
class VisionItem:
    """One encoded image or video. Shapes: embeds [N, H]; deepstack [L, N, H] | None."""

    embeds: torch.Tensor
    deepstack: torch.Tensor | None
    grid_thw: GridTHW
    content_hash: str | None = None


def _content_hasher() -> tuple[Callable[[bytes], Any], str]:
    """BLAKE3 (it reads megabytes of pixels ~4x faster than sha256: bench/ingress_stages.py), or sha256
    where the blake3 package is missing (a machine that installs from a fixed bundle, like the GPU
    device's Ray bundle); then the keys carry a "sha256:" prefix, so a mixed fleet misses, never confuses."""
    try:
        from blake3 import blake3
    except ImportError:
        return hashlib.sha256, "sha256:"
    return blake3, ""


_HASHER, _DIGEST_PREFIX = _content_hasher()


def content_digest(header: str, pixels: np.ndarray) -> str:
    """The content key of `header` then `pixels`' bytes (C order, read in place), as hex.

    The one hash of every pixel key (the router's embedding cache, the engine's prefix cache); it
    releases the GIL while it reads the pixels.
    """
    digest = _HASHER(header.encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return _DIGEST_PREFIX + digest.hexdigest()


def pixels_digest(pixels: np.ndarray) -> str:
    """A content key of one preprocessed image (resized uint8 [H, W, C] pixels): its prefix-cache key.

    The pixels the tower reads, so equal keys mean equal embeddings under one model; cheaper than
    `MultimodalInputs.content_hashes`' digest of the embeddings, which reads them back from the device.
    """
    return content_digest(f"pixels {tuple(pixels.shape)} {pixels.dtype}", pixels)


def frame_groups(video: VisionItem) -> list[VisionItem]:
    """A video's (t, h, w) item as t items of grid (1, h, w), rows split evenly."""
    t, h, w = video.grid_thw
    rows = video.embeds.shape[0] // t
    out = []
    for g in range(t):
        sl = slice(g * rows, (g + 1) * rows)
        deep = None if video.deepstack is None else video.deepstack[:, sl]
        tag = None if video.content_hash is None else f"{video.content_hash}:{g}"
        out.append(VisionItem(video.embeds[sl], deep, (1, h, w), tag))
    return out


def in_prompt_order(
    token_ids: Sequence[int], image_token_id: int | None, video_token_id: int | None,
    images: Sequence[VisionItem], videos: Sequence[VisionItem],
) -> list[VisionItem]:
    """Items in the order of their placeholders; `token_ids` holds one pad per image and per frame group.

    Raises:
        EngineInputError: placeholders and items disagree.
    """
    pads = [t for t in token_ids if t in (image_token_id, video_token_id)]
    groups = [g for v in videos for g in frame_groups(v)]
    if pads.count(image_token_id) != len(images) or pads.count(video_token_id) != len(groups):
        raise EngineInputError(
            f"the prompt has {pads.count(image_token_id)} image and {pads.count(video_token_id)} video "
            f"placeholder(s) for {len(images)} image(s) and {len(groups)} video frame group(s)", param="images",
        )
    image_iter, group_iter = iter(images), iter(groups)
    return [next(image_iter) if t == image_token_id else next(group_iter) for t in pads]


def multimodal_inputs(items: Sequence[VisionItem]) -> MultimodalInputs:
    """Concatenate items (already in prompt order) into the engine's `MultimodalInputs`."""
    deep = [i.deepstack for i in items]
    hashes = [i.content_hash for i in items]
    return MultimodalInputs(
        image_embeds=torch.cat([i.embeds for i in items]),
        deepstack_embeds=None if any(d is None or not d.numel() for d in deep) else torch.cat(deep, dim=1),
        image_grid_thw=tuple(i.grid_thw for i in items),
        image_hashes=None if any(h is None for h in hashes) else tuple(hashes),
    )
