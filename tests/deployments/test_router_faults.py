"""Router fault paths without Ray: in-process stand-ins for the vision and LLM handles, the real
`Router` and `LLMServer` (with the scripted engine) in between. Outside Serve the metrics
recorders have no app to push to."""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.llm import LLMServer
from deployments.messages import ChoiceDelta, Start, Usage
from deployments.metrics import MetricsRecorder
from deployments.pixel_inputs import PixelEncoder
from deployments.protocol import ChatCompletionRequest
from deployments.router import Router
from deployments.vision import ImageEmbedding
from tests.deployments.helpers import data_url, png_bytes
from tests.deployments.scripted_engine import ScriptedEngine


class ObjectLostError(Exception):
    """Named like Ray's: the object died with the replica that was computing it."""


class ActorDiedError(Exception):
    """Named like Ray's: the replica died before taking the call."""


class _Ref:
    """An ObjectRef stand-in: awaiting it gives the embedding, or raises when it was lost."""

    def __init__(self, embedding: ImageEmbedding | None):
        self.embedding = embedding

    def __await__(self):
        if self.embedding is None:
            raise ObjectLostError("the object's owner died")
        return self.embedding
        yield  # a generator, so that asyncio can await it


class _Response:
    def __init__(self, ref: _Ref | None):
        self.ref = ref

    async def _to_object_ref(self) -> _Ref:
        if self.ref is None:
            raise ActorDiedError("the replica died")
        return self.ref


class _Vision:
    """`encode.remote(...)` -> a response; `script` says what each call does ("ok", "lost", "dead")."""

    def __init__(self, hidden: int, layers: int, script: list[str]):
        self.encode, self.hidden, self.layers, self.script, self.calls = self, hidden, layers, script, 0

    def remote(self, pixels, transfer: str) -> _Response:
        what = self.script[self.calls] if self.calls < len(self.script) else "ok"
        self.calls += 1
        if what == "dead":
            return _Response(None)
        grid = (1, pixels.shape[0] // 16, pixels.shape[1] // 16)  # uint8 [H, W, 3], patch 16
        n = grid[1] * grid[2] // 4
        emb = ImageEmbedding(torch.zeros(n, self.hidden), torch.zeros(self.layers, n, self.hidden), grid)
        return _Response(_Ref(emb if what == "ok" else None))


class _Stream:
    """A streaming response: the LLM generator runs in its own task, as in a replica."""

    def __init__(self, agen):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._pump(agen))

    async def _pump(self, agen) -> None:
        try:
            async for item in agen:
                await self.queue.put(("item", item))
            await self.queue.put(("end", None))
        except Exception as exc:
            await self.queue.put(("error", exc))

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, value = await self.queue.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "error":
            raise value
        return value

    def cancel(self) -> None:
        self.task.cancel()


class _LLM:
    """`deployments.llm_client.HandleLLM`'s behaviour: each stream in its own task, as over Serve."""

    def __init__(self, server: LLMServer):
        self.server, self.calls = server, 0

    def stream(self, *args: object) -> _Stream:
        self.calls += 1
        return _Stream(self.server.generate(*args))


@pytest.fixture
def make_router(tiny_checkpoint):
    config = {"model": str(tiny_checkpoint("qwen3_vl")), "model_id": "m", "device": "cpu", "dtype": "float32",
              "llm": {"max_model_len": 512}}

    def make(script: list[str]) -> tuple[Router, _Vision, LLMServer]:
        server = LLMServer(config, engine_cls=ScriptedEngine)
        metrics = MetricsRecorder("OpenAIIngress", "test")
        vision_config = Router(config, None, None, metrics).model_config.vision
        vision = _Vision(vision_config.out_hidden_size, len(vision_config.deepstack_visual_indexes), script)
        return Router(config, vision, _LLM(server), metrics), vision, server

    return make


def _two_image_chat() -> ChatCompletionRequest:
    content = [{"type": "text", "text": "Compare."}] + [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(32, 32, (i, 80, 160)))}} for i in range(2)
    ]
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": content}], "max_tokens": 4})


async def test_retry_reencodes_images_lost_with_the_replica_that_refused_the_next(make_router):
    """The replica dies holding image 1's encode and refuses image 2: the one retry must encode both
    again, not reuse image 1's lost result from the cache."""
    router, vision, server = make_router(["lost", "dead"])
    events = [e async for e in router.chat(_two_image_chat())]
    assert isinstance(events[0], Start) and isinstance(events[-1], Usage)
    assert isinstance(events[-2], ChoiceDelta) and events[-2].finish_reason == "length"
    assert vision.calls == 4  # 2 on the failed attempt, 2 on the retry
    assert len(server.engine.requests) == 1 and not server.engine.aborted  # one engine request, finished


async def test_colocated_ingress_health_is_its_engines(tiny_checkpoint):
    """`llm.colocate_ingress`: the ingress owns the engine, so Serve's health check of the ingress
    fails once the engine is unhealthy (Serve then restarts the replica)."""
    from deployments.openai_api import OpenAIIngress

    config = {"model": str(tiny_checkpoint("qwen3_vl")), "model_id": "m", "device": "cpu", "dtype": "float32",
              "llm": {"max_model_len": 512, "colocate_ingress": True}}
    ingress = OpenAIIngress(config, None, None, engine_cls=ScriptedEngine)
    await ingress.check_health()
    assert ingress.stats()["num_running"] == 0
    ingress.llm_server.engine.is_healthy = lambda: False
    with pytest.raises(RuntimeError, match="unhealthy"):
        await ingress.check_health()


async def test_vision_in_the_replica_encodes_and_a_failed_tower_call_is_not_cached(tiny_checkpoint):
    """`vision.colocate_llm`: the ingress builds its own tower (no handle) and the engine gets its embeddings
    as they came from it. A tower call that raises fails its request with a 503 after the one retry, nothing
    stays cached, and the next request encodes afresh."""
    from deployments.errors import EncoderUnavailableError
    from deployments.openai_api import OpenAIIngress
    from deployments.vision import VisionEncoder

    config = {"model": str(tiny_checkpoint("qwen3_vl")), "model_id": "m", "device": "cpu", "dtype": "float32",
              "llm": {"max_model_len": 512, "colocate_ingress": True}, "vision": {"colocate_llm": True}}
    ingress = OpenAIIngress(config, None, None, engine_cls=ScriptedEngine)
    assert isinstance(ingress.router.vision, VisionEncoder) and ingress.router.vision is ingress.vision
    assert ingress.vision.in_process and ingress.vision.pool is None and ingress.vision.stream is None
    engine = ingress.llm_server.engine
    tower, calls = ingress.vision.model.forward, []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA out of memory (injected)")

    ingress.vision.model.forward = broken
    with pytest.raises(EncoderUnavailableError):
        _ = [e async for e in ingress.router.chat(_two_image_chat())]
    # the retry encoded again (a failed encode is never reused): 2 to 4 tower calls, as the images batch
    assert 2 <= len(calls) <= 4
    assert len(ingress.router.cache) == 0 and not engine.requests
    ingress.vision.model.forward = tower
    events = [e async for e in ingress.router.chat(_two_image_chat())]
    assert isinstance(events[0], Start) and isinstance(events[-1], Usage)
    (request,) = engine.requests.values()
    pads = sum(t == ingress.router.model_config.placeholder_token_ids[0] for t in request["prompt_token_ids"])
    assert request["image_embeds"].shape[0] == pads > 0  # one embedding row per image placeholder


class FailingPixelEncoder(PixelEncoder):
    """The engine process' tower, whose first `failures` calls raise (state pickled into the engine process)."""

    def __init__(self, app_config, device, failures: int = 2):
        super().__init__(app_config, device)
        self.failures, self.calls = failures, 0

    def __getstate__(self):
        return {**super().__getstate__(), "failures": self.failures}

    def __setstate__(self, state):
        self.__init__(state["app_config"], state["device"], state["failures"])

    def encode(self, batch):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("CUDA out of memory (injected)")
        return super().encode(batch)


async def test_vision_in_the_engine_process_and_a_failed_tower_call_is_retried_then_503(tiny_checkpoint, monkeypatch):
    """`vision.colocate_llm` with `llm.engine_process`: the router hands the engine process resized pixels
    (no tower in the ingress); a tower call there that raises fails its request, the router retries once
    (re-preprocessing: nothing stays cached), then answers 503; the next request is encoded and served,
    and the engine is left empty."""
    import deployments.llm
    from deployments.errors import EncoderUnavailableError
    from deployments.openai_api import OpenAIIngress
    from deployments.pixel_inputs import EngineTower, ImagePixels

    monkeypatch.setattr(deployments.llm, "PixelEncoder", FailingPixelEncoder)
    config = {"model": str(tiny_checkpoint("qwen3_vl")), "model_id": "m", "device": "cpu", "dtype": "float32",
              "llm": {"max_model_len": 512, "num_gpu_blocks": 64, "colocate_ingress": True, "engine_process": True},
              "vision": {"colocate_llm": True}}
    ingress = OpenAIIngress(config, None, None)
    try:
        assert ingress.vision is None and isinstance(ingress.router.vision, EngineTower)
        engine = ingress.llm_server.engine
        with pytest.raises(EncoderUnavailableError):
            _ = [e async for e in ingress.router.chat(_two_image_chat())]
        assert len(ingress.router.cache) == 0
        events = [e async for e in ingress.router.chat(_two_image_chat())]
        assert isinstance(events[0], Start) and isinstance(events[-1], Usage)
        assert events[-1].completion_tokens == 4
        assert all(isinstance(ref, ImagePixels) for ref in ingress.router.cache.values())
        (record,) = ingress.vision_timeline().records  # the two failed calls left no record
        assert record.images == 2
        stats = engine.stats()
        assert stats["num_running"] == stats["num_waiting"] == 0
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
    finally:
        ingress.llm_server.engine.shutdown()
