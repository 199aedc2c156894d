"""The ingress keeps per-image megabyte work off its event loop: base64 decode, pixel decode, cache key,
resize, all in one worker thread per image.

A request's image work on the loop holds up every other request and every streamed
token of that replica (bench/ingress_stages.py times each stage).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading

import numpy as np
import PIL.Image
import pytest

import deployments.media as media
from deployments.config import LimitsConfig
from deployments.embedding_cache import EmbeddingCache, image_key, pixels_key, video_key
import deployments.router as router_module
from deployments.router import EncodedImages, Router, encoded_digest
from engine.multimodal import content_digest, pixels_digest
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


def _reference_digest(data: bytes) -> str:
    """The content hash as the blake3 package computes it over one buffer (sha256 where it is missing)."""
    try:
        from blake3 import blake3
    except ImportError:
        return "sha256:" + hashlib.sha256(data).hexdigest()
    return blake3(data).hexdigest()


def test_content_digest_hashes_header_then_pixels_in_c_order() -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)
    assert content_digest("head", pixels) == _reference_digest(b"head" + pixels.tobytes())
    strided = rng.integers(0, 256, (40, 34, 3), dtype=np.uint8)[::2, ::2]  # not contiguous: read in C order
    assert content_digest("h", strided) == _reference_digest(b"h" + strided.tobytes())
    assert pixels_digest(pixels) == _reference_digest(f"pixels {pixels.shape} uint8".encode() + pixels.tobytes())


def test_without_blake3_keys_are_prefixed_sha256(monkeypatch) -> None:
    import sys

    from engine import multimodal

    monkeypatch.setitem(sys.modules, "blake3", None)  # import blake3 now raises ImportError
    hasher, prefix = multimodal._content_hasher()
    assert prefix == "sha256:" and hasher(b"abc").hexdigest() == hashlib.sha256(b"abc").hexdigest()


def test_video_key_hashes_the_frames() -> None:
    import torch

    frames = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    header = f"m\0s\0video\0{tuple(frames.shape)}\0".encode()
    assert video_key(frames, "s", "m") == _reference_digest(header + frames.numpy().tobytes())
    other = frames.clone()
    other[1, 5, 5, 2] ^= 1
    assert video_key(other, "s", "m") != video_key(frames, "s", "m")


def _encoded(image: PIL.Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_image_keys_follow_the_decoded_pixels_not_the_encoding() -> None:
    """Equal pixels in PNG, BMP, lossless WebP and TIFF: one key; a JPEG of them (lossy) or another image: others."""
    rng = np.random.default_rng(4)
    image = PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    blobs = {fmt: _encoded(image, fmt, **kw) for fmt, kw in
             (("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("JPEG", {"quality": 90}))}
    decoded = {fmt: media.decode_image(data, _policy()) for fmt, data in blobs.items()}
    keys = {fmt: image_key(im, "s", "m") for fmt, im in decoded.items()}
    for fmt, im in decoded.items():  # the reference: equal keys exactly where the decoded pixels are equal
        for other, im2 in decoded.items():
            same = im.size == im2.size and np.array_equal(np.asarray(im), np.asarray(im2))
            assert (keys[fmt] == keys[other]) == same, (fmt, other)
    assert keys["PNG"] == keys["BMP"] == keys["WEBP"] == keys["TIFF"] != keys["JPEG"]
    transposed = PIL.Image.fromarray(np.ascontiguousarray(np.asarray(image).reshape(64, 48, 3)))
    assert image_key(transposed, "s", "m") != keys["PNG"]  # same bytes, another size
    assert image_key(decoded["PNG"], "s", "other-model") != keys["PNG"]


def _router(processor: ImageProcessor) -> Router:
    """A Router with only what preparing images reads (no checkpoint, no deployments)."""
    router = Router.__new__(Router)
    router.processor, router._settings, router.model_id = processor, repr(processor), "m"
    router.cache, router.encoded, router.policy = EmbeddingCache(1 << 20), EncodedImages(), _policy()
    return router


_SMALL = dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=256 * 256)


@pytest.mark.parametrize("size, resized, cached", [((64, 96), False, False), ((70, 90), True, False),
                                                   ((70, 90), True, True), ((64, 96), False, True)])
def test_router_prepares_an_image_in_its_decode_thread(size, resized, cached) -> None:
    """Key, grid and the tower's pixels come out of the thread that decoded the image; a resize is
    skipped only while the cache holds the key."""
    processor = ImageProcessor(**_SMALL)
    rng = np.random.default_rng(1)
    source = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    router = _router(processor)
    key = image_key(source, repr(processor), "m")
    if cached:
        router.cache.put(key, object(), 10)
    threads: list[str] = []

    def prepare(data):
        threads.append(threading.current_thread().name)
        return router._prepare_image(data)

    async def load():
        loaded = await media.load_request_image(data_url(_encoded(source, "PNG")), _policy(), prepare)
        return loaded, threading.current_thread().name

    loaded, loop_thread = asyncio.run(load())
    assert threads and threads[0] != loop_thread
    assert loaded.key == key
    assert loaded.grid_thw == processor.grid_thw(size[1], size[0])
    if resized and cached:
        assert loaded.pixels is None and np.array_equal(np.asarray(loaded.image), np.asarray(source))
    else:
        assert loaded.image is None and np.array_equal(loaded.pixels, processor.resize(source))


def test_router_prepare_refuses_an_image_no_grid_fits() -> None:
    processor = ImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    with pytest.raises(media.MediaError, match="aspect ratio"):
        _router(processor)._prepare_image(_encoded(PIL.Image.new("RGB", (4000, 8)), "PNG"))


@pytest.mark.parametrize("size", [(64, 96), (70, 90)])
def test_a_known_file_with_cached_embeddings_is_not_decoded_again(size, monkeypatch) -> None:
    """The second time a file comes (a chat resending its image), its key and grid come from the
    file's digest while the cache holds its embeddings: no decode. Without the entry (evicted) it is
    decoded again; equal pixels in another file share the key; and the tower's pixels of a hit whose
    entry is gone by the encode are the reference's (`ImageProcessor.resize` of the decoded image)."""
    processor = ImageProcessor(**_SMALL)
    rng = np.random.default_rng(2)
    source = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    png, bmp = _encoded(source, "PNG"), _encoded(source, "BMP")
    router = _router(processor)
    decodes: list[int] = []
    real = router_module.decode_image

    def counting(data, policy):
        decodes.append(len(data))
        return real(data, policy)

    monkeypatch.setattr(router_module, "decode_image", counting)
    first = router._prepare_image(png)
    assert decodes == [len(png)] and first.pixels is not None
    again = router._prepare_image(png)  # known, but its embeddings are not cached: decoded again
    assert decodes == [len(png)] * 2 and np.array_equal(again.pixels, first.pixels)
    router.cache.put(first.key, object(), 10)
    hit = router._prepare_image(png)
    assert decodes == [len(png)] * 2  # no decode
    assert (hit.key, hit.grid_thw, hit.pixels, hit.image, hit.data) == (first.key, first.grid_thw, None, None, png)
    other = router._prepare_image(bmp)  # another file of the same pixels: decoded, same key
    assert decodes[-1] == len(bmp) and other.key == first.key
    expected = processor.resize(media.decode_image(png, _policy()))
    assert np.array_equal(router._pixels_again(hit), expected)
    router.cache.pop(first.key)
    assert router._prepare_image(png).pixels is not None and decodes[-1] == len(png)


def test_known_files_are_bounded_least_recently_used_first() -> None:
    seen = EncodedImages(capacity=2)
    seen.put("a", "ka", (1, 2, 2))
    seen.put("b", "kb", (1, 2, 2))
    assert seen.get("a") == ("ka", (1, 2, 2))  # "a" is now the most recent
    seen.put("c", "kc", (1, 4, 4))
    assert len(seen) == 2 and seen.get("b") is None and seen.get("a") is not None and seen.get("c") is not None
    assert encoded_digest(b"x") != encoded_digest(b"y") and encoded_digest(b"x") == encoded_digest(b"x")
