"""`vision.colocate_llm` with `llm.engine_process`: the vision tower in the engine process.

Without Ray, on the tiny Qwen3-VL (CPU, fp32): `PixelEncoder` (the engine process' tower)
batched == one image at a time and its device cache; the encoder thread (`EncodeWorker`) never
adds a request aborted while it is encoded and fails only the batch whose encode raised; and a
real `EngineProcess` with the tower answers what the in-process engine does with the
in-process `VisionEncoder`'s embeddings, and leaks no sequence when a request is aborted
while it is encoded. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch

from deployments.pixel_inputs import EngineTower, ImagePixels, PixelEncoder, PixelInputs
from engine.core.encoding import EncodeWorker
from engine.core.messages import Encoded, NewRequest, StepOutputs
from engine.sampling_params import SamplingParams
from tests.deployments.helpers import tiny_checkpoint_fixture

HANG_GUARD_S = 120.0
ckpt = tiny_checkpoint_fixture("qwen3_vl")


def _app(ckpt, **extra) -> dict:
    return {"model": str(ckpt), "device": "cpu", "dtype": "float32", "vision": {"max_batch_size": 4}, **extra}


def _image(ckpt, width: int, height: int, color: tuple[int, int, int]) -> ImagePixels:
    """An image as the router hands it over: resized pixels, grid and content key."""
    from models.config import load_model_config
    from models.processor import ImageProcessor

    processor = ImageProcessor.from_pretrained(ckpt)
    pixels = processor.resize(PIL.Image.new("RGB", (width, height), color))
    noise = np.random.default_rng(width * height).integers(0, 40, pixels.shape, dtype=np.uint8)
    pixels = pixels + noise  # not flat: every patch differs
    return EngineTower(load_model_config(ckpt)).pixels(pixels, processor.grid_thw(*pixels.shape[:2]),
                                                       f"{width}x{height}-{color}")


def _encoder(ckpt, cache_bytes: int = 2**24) -> PixelEncoder:
    encoder = PixelEncoder(_app(ckpt, embedding_cache_bytes=cache_bytes), "cpu")
    encoder.load()
    return encoder


def test_a_batched_encode_equals_one_image_at_a_time_and_repeats_come_from_the_cache(ckpt):
    a, b, c = _image(ckpt, 64, 48, (200, 10, 10)), _image(ckpt, 40, 96, (10, 200, 10)), _image(ckpt, 56, 56, (1, 2, 3))
    alone = _encoder(ckpt, cache_bytes=0)
    want = [alone.encode([PixelInputs((i,))])[0][0] for i in (a, b, c)]
    encoder = _encoder(ckpt)
    got, record = encoder.encode([PixelInputs((a,)), PixelInputs((b, c))])
    assert record.images == 3 and record.patches == sum(int(np.prod(i.grid_thw)) for i in (a, b, c))
    assert got[0].image_grid_thw == want[0].image_grid_thw and got[0].image_hashes == want[0].image_hashes
    assert got[0].image_hashes[0].startswith(a.key)  # the router's key is the prefix-cache key
    torch.testing.assert_close(got[0].image_embeds, want[0].image_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0].deepstack_embeds, want[0].deepstack_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1].image_embeds, torch.cat([want[1].image_embeds, want[2].image_embeds]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1].deepstack_embeds,
                               torch.cat([want[1].deepstack_embeds, want[2].deepstack_embeds], 1), rtol=1e-4, atol=1e-5)
    assert got[1].image_grid_thw == (b.grid_thw, c.grid_thw)
    assert got[1].image_hashes == want[1].image_hashes + want[2].image_hashes
    # The placeholder the front end validated has the encoded shapes.
    meta = PixelInputs((b, c)).placeholder()
    assert meta.image_embeds.shape == got[1].image_embeds.shape
    assert meta.deepstack_embeds.shape == got[1].deepstack_embeds.shape
    # Again, and one image twice in one batch: the device cache answers, the tower does not run.
    again, record = encoder.encode([PixelInputs((c, a)), PixelInputs((c,))])
    assert record is None
    torch.testing.assert_close(again[0].image_embeds, torch.cat([want[2].image_embeds, want[0].image_embeds]))
    torch.testing.assert_close(again[1].image_embeds, want[2].image_embeds)


def test_an_image_whose_pixels_disagree_with_its_grid_is_refused(ckpt):
    a = _image(ckpt, 64, 48, (200, 10, 10))
    lying = ImagePixels(a.pixels[:, :32].contiguous(), a.grid_thw, "lying", a.embeds_shape, a.deepstack_shape)
    with pytest.raises(ValueError, match="patch grid"):
        _encoder(ckpt).encode([PixelInputs((lying,))])


class _GatedEncoder:
    """The real encoder behind a gate: `encode` waits for `go`, then raises while `failing`."""

    def __init__(self, inner: PixelEncoder):
        self.inner, self.max_batch_size = inner, inner.max_batch_size
        self.started, self.go, self.failing, self.batches = threading.Event(), threading.Event(), False, []

    def accepts(self, mm):
        return self.inner.accepts(mm)

    def count(self, mm):
        return self.inner.count(mm)

    def encode(self, batch):
        self.batches.append(len(batch))
        self.started.set()
        assert self.go.wait(HANG_GUARD_S)
        if self.failing:
            raise RuntimeError("CUDA out of memory (injected)")
        return self.inner.encode(batch)


class _Recorder:
    """What the worker adds to the engine and sends to the front end."""

    def __init__(self):
        self.added, self.sent = [], []

    def add(self, ready):
        self.added += ready

    def finals(self) -> dict[str, tuple[str, str | None]]:
        return {o.request_id: (o.finish_reason, o.error) for m in self.sent if isinstance(m, StepOutputs)
                for o in m.outputs()}


def _request(rid: str, mm: PixelInputs) -> NewRequest:
    return NewRequest(rid, [1, 2, 3], mm, SamplingParams(max_tokens=2))


def _wait(predicate) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_request_aborted_while_it_is_encoded_is_never_added(ckpt):
    a, b = _image(ckpt, 64, 48, (200, 10, 10)), _image(ckpt, 40, 96, (10, 200, 10))
    gated, seen = _GatedEncoder(_encoder(ckpt)), _Recorder()
    worker = EncodeWorker(gated, seen.add, seen.sent.append)
    try:
        worker.submit([_request("r1", PixelInputs((a,)))])
        assert gated.started.wait(HANG_GUARD_S)
        worker.submit([_request("r2", PixelInputs((b,))), _request("r3", PixelInputs((a,)))])  # queued behind r1
        assert worker.abort("r1") and worker.abort("r2")
        assert not worker.abort("r1") and not worker.abort("unknown")  # not here: the engine's to abort
        gated.go.set()
        _wait(lambda: len(seen.added) == 1)
        assert [req.request_id for req, _ in seen.added] == ["r3"]
        assert seen.finals() == {"r1": ("abort", None), "r2": ("abort", None)}
        assert gated.batches == [1, 1]  # r2 was skipped when the next batch formed
        assert sum(isinstance(m, Encoded) for m in seen.sent) == 1  # r1's call; r3's image then was cached
        assert not worker.abort("r3")  # added: the engine holds it now
    finally:
        gated.go.set()
        worker.stop()


def test_a_failed_encode_fails_its_batch_and_the_next_request_is_added(ckpt):
    a, b = _image(ckpt, 64, 48, (200, 10, 10)), _image(ckpt, 40, 96, (10, 200, 10))
    gated, seen = _GatedEncoder(_encoder(ckpt)), _Recorder()
    gated.failing = True
    worker = EncodeWorker(gated, seen.add, seen.sent.append)
    try:
        worker.submit([_request("r1", PixelInputs((a,))), _request("r2", PixelInputs((b, a)))])  # one batch
        gated.go.set()
        _wait(lambda: len(seen.finals()) == 2)
        assert gated.batches == [2] and not seen.added
        for reason, error in seen.finals().values():
            assert reason == "error" and "CUDA out of memory (injected)" in error
        gated.failing = False
        worker.submit([_request("r3", PixelInputs((b,)))])
        _wait(lambda: len(seen.added) == 1)
        (req, mm), = seen.added
        assert req.request_id == "r3" and mm.image_embeds.shape == PixelInputs((b,)).placeholder().image_embeds.shape
        assert len(seen.finals()) == 2
    finally:
        worker.stop()


def test_batches_hold_at_most_max_batch_size_images(ckpt):
    a = _image(ckpt, 64, 48, (200, 10, 10))
    gated, seen = _GatedEncoder(_encoder(ckpt)), _Recorder()
    worker = EncodeWorker(gated, seen.add, seen.sent.append)
    try:
        worker.submit([_request("first", PixelInputs((a,)))])
        assert gated.started.wait(HANG_GUARD_S)
        worker.submit([_request(f"r{k}", PixelInputs((a, a))) for k in range(3)]
                      + [_request("wide", PixelInputs((a,) * 6))])
        gated.go.set()
        _wait(lambda: len(seen.added) == 5)
        assert gated.batches == [1, 2, 1, 1]  # 4 images, then 2, then the one over the bound alone
        assert [req.request_id for req, _ in seen.added] == ["first", "r0", "r1", "r2", "wide"]
    finally:
        worker.stop()


def test_the_engine_process_with_the_tower_answers_what_the_in_process_engine_does(ckpt):
    """Greedy tokens of an image request through `EngineProcess(encoder=PixelEncoder)` == the in-process
    engine's on the in-process `VisionEncoder`'s embeddings; a request aborted at once leaves no sequence."""
    from deployments.image_inputs import merge_images
    from deployments.vision import VisionEncoder
    from engine.core import EngineProcess
    from engine.engine import Engine, EngineConfig
    from models.config import load_model_config

    mc = load_model_config(ckpt)
    image = _image(ckpt, 64, 48, (200, 10, 10))
    ids = [11, mc.vision_start_token_id] + [mc.image_token_id] * image.num_tokens + [mc.vision_start_token_id + 1, 12]
    config = EngineConfig(model=str(ckpt), dtype="float32", device="cpu", max_model_len=512, num_gpu_blocks=64)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def outputs(engine, rid, mm) -> list:
        async def run():
            return [out async for out in engine.add_request(rid, ids, mm, sp)]
        return await asyncio.wait_for(run(), HANG_GUARD_S)

    tower = VisionEncoder(_app(ckpt), in_process=True)
    embedding = asyncio.run(tower.encode(image.pixels.numpy(), "auto"))
    engine = Engine(config)
    try:
        want = [t for o in asyncio.run(outputs(engine, "ref", merge_images([embedding], (image.key,))))
                for t in o.new_token_ids]
    finally:
        engine.shutdown()
    process = EngineProcess(config, encoder=PixelEncoder(_app(ckpt), "cpu"))
    try:
        got = asyncio.run(outputs(process, "img", PixelInputs((image,))))
        assert [t for o in got for t in o.new_token_ids] == want and len(want) == 8
        assert process.encode_timeline().records[0].images == 1
        other = _image(ckpt, 96, 40, (5, 5, 250))
        ids_other = ids[:2] + [mc.image_token_id] * other.num_tokens + ids[-2:]

        async def aborted_at_once() -> list:
            stream = process.add_request("gone", ids_other, PixelInputs((other,)), sp)
            process.abort("gone")
            return [o.finish_reason async for o in stream]
        assert asyncio.run(asyncio.wait_for(aborted_at_once(), HANG_GUARD_S)) == ["abort"]
        deadline = time.monotonic() + HANG_GUARD_S
        while (stats := process.stats())["num_running"] + stats["num_waiting"] or \
                stats["num_free_blocks"] != stats["num_total_blocks"]:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        again = asyncio.run(outputs(process, "img2", PixelInputs((image,))))  # cached in the engine process
        assert [t for o in again for t in o.new_token_ids] == want
    finally:
        process.shutdown()
