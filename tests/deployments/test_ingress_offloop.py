"""The ingress keeps per-image megabyte work off its event loop: base64 decode, pixel decode, cache key.

A request's image work on the loop holds up every other request and every streamed
token of that replica (bench/ingress_stages.py times each stage).
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest

import deployments.media as media
from deployments.config import LimitsConfig
from deployments.embedding_cache import image_key, pixels_key
from deployments.router import Router
from models.processor import ImageProcessor
from tests.deployments.helpers import data_url, png_bytes


def _policy() -> media.MediaPolicy:
    return media.MediaPolicy.from_limits(LimitsConfig())


def test_data_url_base64_and_pixels_decode_in_a_worker_thread(monkeypatch) -> None:
    threads: list[str] = []
    real = media.decode_data_url

    def spy(url: str, policy: media.MediaPolicy) -> bytes:
        threads.append(threading.current_thread().name)
        return real(url, policy)

    monkeypatch.setattr(media, "decode_data_url", spy)
    data = png_bytes(48, 32)

    async def load() -> tuple[PIL.Image.Image, str]:
        return await media.load_request_image(data_url(data), _policy()), threading.current_thread().name

    image, loop_thread = asyncio.run(load())
    assert image.size == (48, 32) and image.mode == "RGB"
    assert threads and threads[0] != loop_thread
    assert np.array_equal(np.asarray(image), np.asarray(media.decode_image(data, _policy())))


@pytest.mark.parametrize("size", [(64, 64), (37, 53)])
def test_pixels_key_is_image_key(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert pixels_key(np.asarray(image), image.mode, "s", "m") == image_key(image, "s", "m")
    other = np.asarray(image).copy()
    other[0, 0, 0] ^= 1
    assert pixels_key(other, image.mode, "s", "m") != image_key(image, "s", "m")
    assert pixels_key(np.asarray(image), image.mode, "t", "m") != image_key(image, "s", "m")


@pytest.mark.parametrize("size, resized", [((64, 96), False), ((70, 90), True)])
def test_router_image_key_hands_over_pixels_only_when_no_resize_is_due(size, resized) -> None:
    processor = ImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                               max_pixels=256 * 256)
    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    router = SimpleNamespace(processor=processor, _settings=repr(processor), model_id="m")
    key, pixels = Router._image_key(router, image)
    assert key == image_key(image, repr(processor), "m")
    if resized:
        assert pixels is None
    else:
        assert pixels is not None and np.array_equal(pixels, processor.resize(image))
