"""The router: request -> prompt ids + image embeddings -> LLM stream -> text.

It lives in each ingress replica (`OpenAIIngress` builds one over the vision and
LLM handles): no Serve hop between ingress and router, per request or per token.
Per request: deployment limits, chat template + tokenization, images loaded
(`deployments.media`) and checked, placeholders expanded, then for every image
the embedding cache is asked for an ObjectRef; a miss preprocesses the image
and calls `vision.encode`, converting its `DeploymentResponse` to an ObjectRef
without awaiting the result. The refs go to `llm.generate` as they are, so the
embedding bytes travel encoder -> LLM replica (a CUDA IPC handle on one node, else the
object store: `deployments/embedding_transfer.py`) and this process never deserializes them. `TokenDelta`s stream back; each choice is detokenized
incrementally with stop strings applied.

`chat` / `complete` are async generators of `deployments.messages.RouterEvent`s:
`Start` once the LLM has sent its first delta, then `ChoiceDelta`s, finally
`Usage`. Errors before `Start` are typed `APIError`s the ingress maps to a
status: bad input (4xx, the engine's context-length check included), an
overloaded LLM deployment (its `max_queued_requests` exceeded: 503 with
Retry-After), a dead replica (503). When a vision replica dies holding a
request's encodes, the images are re-encoded and the request retried once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from deployments.config import AppConfig, ensure_checkpoint, resolve_dtype
from deployments.detokenize import IncrementalDetokenizer
from deployments.embedding_cache import EmbeddingCache, pixels_key, video_key
from deployments.llm_client import LLMClient
from deployments.errors import (
    EncoderUnavailableError,
    InternalServerError,
    InvalidRequestError,
    MediaError,
    as_api_error,
    is_replica_death,
)
from deployments.media import MediaPolicy, decode_image, load_request_image, load_request_video
from deployments.messages import ChoiceDelta, RouterEvent, Start, TextLogprob, TokenDelta, Usage
from deployments.metrics import FINE_LATENCY_BUCKETS, MetricsRecorder
from deployments.prompt import (
    chat_prompt_text,
    check_limits,
    completion_prompt_ids,
    expand_image_pads,
    expand_videos,
    media_parts,
    sampling_params,
)
from deployments.protocol import ChatCompletionRequest, CompletionRequest
from deployments.pixel_inputs import EngineTower, ImagePixels
from deployments.vision import VisionEncoder
from engine.multimodal import content_digest
from engine.sampling_params import SamplingParams
from models.video_io import PreparedVideo, VideoLimits

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """One request image as its worker thread left it: keyed, and (unless cached) decoded and resized.

    Shapes: pixels [h, w, 3] uint8 at the patch grid's size. `pixels` is None while the embedding
    cache held `key`: then `image` (the decoded RGB image) or, where the encoded bytes were known and
    so not decoded at all, `data` (those bytes) is kept, to resize should that entry be gone by the
    encode.
    """

    key: str
    grid_thw: tuple[int, int, int]
    pixels: np.ndarray | None
    image: Any | None  # PIL.Image.Image
    data: bytes | None = None


class EncodedImages:
    """What the router learnt of recently seen encoded images: the digest of a file's bytes ->
    (its pixel key, patch grid), so a known file (a chat resending its earlier images every turn)
    whose embeddings are cached is neither decoded nor hashed pixel by pixel again.

    The pixel key stays the cache's key (equal pixels in another encoding still hit); the same bytes
    always decode to the same pixels, so this map never answers wrongly, only sooner. At most
    `capacity` entries, least recently used out first; used from the images' worker threads.
    """

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[str, tuple[int, int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> tuple[str, tuple[int, int, int]] | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
            return entry

    def put(self, digest: str, key: str, grid: tuple[int, int, int]) -> None:
        with self._lock:
            self._entries[digest] = (key, grid)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def encoded_digest(data: bytes) -> str:
    """The digest of an image file's bytes (`EncodedImages`' key)."""
    return content_digest("encoded image\0", np.frombuffer(data, dtype=np.uint8))


@dataclass(frozen=True, slots=True)
class _ChoiceDone:
    """A choice's last word on the router's internal queue: how many tokens it generated."""

    index: int
    num_tokens: int


class Router:
    """One ingress replica's router; see the module docstring."""

    def __init__(self, app_config: dict[str, Any], vision: Any | None, llm: LLMClient | None,
                 metrics: MetricsRecorder):
        """`vision`: the vision deployment's handle; `llm`: the LLM (`deployments.llm_client`: over its
        deployment's handle, or in this process); `metrics`: the ingress replica's recorder."""
        from transformers import AutoTokenizer

        from models.config import load_model_config
        from models.processor import ImageProcessor
        from models.video_processor import VideoProcessor
        from models.registry import get_task

        self.config = AppConfig.model_validate(app_config)
        path = ensure_checkpoint(self.config)
        self.model_config = load_model_config(path)
        self.task = get_task(self.model_config, self.config.disable_vision_encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.processor = ImageProcessor.from_pretrained(path) if self.task.accepts_images else None
        self.video_processor = VideoProcessor.from_pretrained(path) if self.task.accepts_images else None
        self.model_id = self.config.served_model_id
        self.vision = vision if self.task.accepts_images else None
        self.llm = llm
        self.limits = self.config.limits
        self.policy = MediaPolicy.from_limits(self.limits)
        self.video_policy = self.policy.for_videos(self.limits.max_video_bytes)
        self.video_limits = VideoLimits(
            self.limits.max_video_seconds, self.limits.max_video_frames, self.limits.max_image_pixels
        )
        self.cache = EmbeddingCache(self.config.embedding_cache_bytes)
        self.encoded = EncodedImages()
        self._settings = repr(self.processor) if self.processor is not None else ""
        self._video_settings = repr(self.video_processor) if self.video_processor is not None else ""
        self.metrics = metrics
        self._set_pil_bomb_guard()

    def _set_pil_bomb_guard(self) -> None:
        # PIL refuses (DecompressionBombError) headers over 2x this many pixels;
        # our own header check rejects anything over max_image_pixels first.
        import PIL.Image

        PIL.Image.MAX_IMAGE_PIXELS = self.limits.max_image_pixels

    # ------------------------------------------------------------ entry points

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[RouterEvent]:
        start = time.monotonic()
        check_limits(request, self.limits)
        media = media_parts(request)
        self._check_media_counts(media)
        text = chat_prompt_text(self.tokenizer, request)
        images: list[Any] = []
        counts: list[int] = []
        if media:
            images, counts, text = await self._load_media(media, text)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if media:
            ids = expand_image_pads(ids, self.model_config.placeholder_token_ids, counts)
            counts = self._per_item(images, counts)
        sampling = self._sampling(request, len(ids))
        # A vision replica dying with this request's encodes in flight loses
        # their embeddings; re-encode (on a live replica) and retry once.
        attempts = 2 if images else 1
        for attempt in range(attempts):
            events: AsyncIterator[RouterEvent] | None = None
            try:
                # The retry asks for the object store: the lost embeddings may have been an IPC
                # handle this LLM replica could not read (another node, a reused pool slot).
                refs, keys = await self._embed(images, counts, "auto" if attempt == 0 else "object_store")
                events = self._generate([ids], sampling, refs, keys, request.stop, start)
                first = await anext(events)
            except EncoderUnavailableError as exc:
                if attempt + 1 == attempts:
                    raise
                logger.warning("retrying a request whose image embeddings were lost: %s", exc.message)
                self.metrics.inc("splitvl_vision_encode_retries_total")
                continue
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()
            return

    async def complete(self, request: CompletionRequest) -> AsyncIterator[RouterEvent]:
        """`echo`: each choice's text starts with its prompt (a token-id prompt decoded), sent before the
        first generated token; with `logprobs` it would need the prompt's logprobs, which are not served."""
        start = time.monotonic()
        check_limits(request, self.limits)
        if request.echo and request.logprobs is not None:
            raise InvalidRequestError("echo with logprobs is not supported (it needs the prompt's logprobs)", "echo")
        prompts = request.prompts
        if len(prompts) > self.limits.max_prompts_per_request:
            raise InvalidRequestError(
                f"{len(prompts)} prompts; at most {self.limits.max_prompts_per_request} per request", "prompt"
            )
        all_ids: list[list[int]] = []
        sampling: list[SamplingParams] = []
        for prompt in prompts:
            ids = completion_prompt_ids(self.tokenizer, prompt, self.model_config.text.vocab_size)
            if any(t in ids for t in self.model_config.placeholder_token_ids):
                raise InvalidRequestError("completion prompts cannot contain image or video placeholder tokens",
                                          "prompt")
            all_ids.append(ids)
            sampling += self._sampling(request, len(ids))
        events = self._generate(all_ids, sampling, [], [], request.stop, start)
        try:
            yield await anext(events)  # Start: the LLM took every choice
            if request.echo:
                for p, prompt in enumerate(prompts):
                    text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
                    for j in range(request.n):
                        yield ChoiceDelta(p * request.n + j, text)
            async for event in events:
                yield event
        finally:
            await events.aclose()

    def debug_state(self) -> dict[str, Any]:
        """What this process holds: cache value types and every live tensor's shape."""
        import gc

        import torch

        shapes = [tuple(o.shape) for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        return {
            "cache_entries": len(self.cache),
            "cache_bytes": self.cache.nbytes,
            "cache_value_types": sorted({type(v).__name__ for v in self.cache.values()}),
            "live_tensor_shapes": shapes,
        }

    # ------------------------------------------------------------ steps

    def _sampling(self, request: ChatCompletionRequest | CompletionRequest, prompt_len: int) -> list[SamplingParams]:
        """The engine's sampling settings of each of the request's `n` choices."""
        return [
            sampling_params(request, prompt_len, self.config.llm.max_model_len, self.limits,
                            self.model_config.text.vocab_size, seed_offset=i)
            for i in range(request.n)
        ]

    def _check_media_counts(self, media: list[tuple[str, str]]) -> None:
        if media and not self.task.accepts_images:
            raise InvalidRequestError(
                f"this deployment does not accept images or videos: {self.task.reason}", "messages",
                code="vision_encoder_disabled",
            )
        for kind, limit in (("image", self.limits.max_images_per_request),
                            ("video", self.limits.max_videos_per_request)):
            n = sum(1 for k, _ in media if k == kind)
            if n > limit:
                raise InvalidRequestError(f"{n} {kind}s; at most {limit} per request", "messages")

    async def _load_media(self, media: list[tuple[str, str]], text: str) -> tuple[list[Any], list[int], str]:
        """Load every image and video (in prompt order); returns them, the placeholder
        counts (one per image, one per video frame group) and the text with timestamps."""
        from models.video_processor import video_prompt

        image_urls_ = [u for k, u in media if k == "image"]
        video_urls = [u for k, u in media if k == "video"]
        loaded_images, image_counts = await self._load_images(image_urls_) if image_urls_ else ([], [])
        videos = await asyncio.gather(*(load_request_video(u, self.video_policy, self.video_processor,
                                                           self.video_limits) for u in video_urls))
        vp = self.video_processor
        text = expand_videos(text, [
            video_prompt(v.timestamps, vp.tokens_per_frame_group(v.grid_thw), "<|vision_start|>", "<|video_pad|>",
                         "<|vision_end|>", pads=1) for v in videos])
        image_iter, video_iter = iter(zip(loaded_images, image_counts)), iter(videos)
        items, counts = [], []
        for kind, _ in media:
            if kind == "image":
                image, count = next(image_iter)
                items.append(image)
                counts.append(count)
            else:
                video = next(video_iter)
                items.append(video)
                counts += [vp.tokens_per_frame_group(video.grid_thw)] * video.grid_thw[0]
        return items, counts, text

    def _per_item(self, items: list[Any], counts: list[int]) -> list[int]:
        """Placeholder counts regrouped to one total per item (a video's frame groups summed)."""
        out, k = [], 0
        for item in items:
            groups = item.grid_thw[0] if isinstance(item, PreparedVideo) else 1
            out.append(sum(counts[k : k + groups]))
            k += groups
        return out

    async def _load_images(self, urls: list[str]) -> tuple[list[LoadedImage], list[int]]:
        """Fetch, decode, key and resize every image, each in one worker thread; (images, image-token
        count of each)."""
        loaded = await asyncio.gather(*(load_request_image(u, self.policy, self._prepare_image) for u in urls),
                                      return_exceptions=True)
        for item in loaded:
            if isinstance(item, BaseException):
                raise item
        return list(loaded), [self.processor.num_image_tokens(item.grid_thw) for item in loaded]

    def _prepare_image(self, data: bytes) -> LoadedImage:
        """In the image's worker thread, from its encoded bytes: a known file whose embeddings are
        cached is answered from `encoded` (no decode); else the image is decoded and prepared
        (`_prepare_decoded`), and its file remembered.

        Raises:
            MediaError: not an image, over a limit, or no patch grid fits it.
        """
        digest = encoded_digest(data)
        known = self.encoded.get(digest)
        # Read off the event loop, the cache's answer is a hint: an entry evicted since costs a decode then.
        if known is not None and known[0] in self.cache:
            return LoadedImage(known[0], known[1], None, None, data)
        loaded = self._prepare_decoded(decode_image(data, self.policy))
        self.encoded.put(digest, loaded.key, loaded.grid_thw)
        return loaded

    def _prepare_decoded(self, image: Any) -> LoadedImage:
        """A decoded image's cache key (hashed in place in the one copy out of PIL) and the pixels the
        tower reads, unless the cache holds the key (then no resize is spent on a hit).

        Raises:
            MediaError: no patch grid fits the image (aspect ratio, size).
        """
        from models.processor import ImageError

        try:
            grid = self.processor.grid_thw(image.height, image.width)
        except ImageError as exc:
            raise MediaError(str(exc), param="image_url") from exc
        pixels = np.asarray(image)
        key = pixels_key(pixels, image.mode, self._settings, self.model_id)
        if self.processor.target_size(image.height, image.width) == (image.height, image.width):
            return LoadedImage(key, grid, pixels, None)
        if key in self.cache:
            return LoadedImage(key, grid, None, image)
        return LoadedImage(key, grid, self.processor.resize(image), None)

    async def _embed(self, images: list[Any], counts: list[int], transfer: str) -> tuple[list[Any], list[str]]:
        """One ObjectRef of embeddings per image (from the cache or a new encode), and its cache key.

        `transfer` ("auto" or "object_store") is how a new encode's result should travel.
        """
        refs, keys = [], []
        for image, num_tokens in zip(images, counts, strict=True):
            if isinstance(image, PreparedVideo):  # megabytes of frames: hashed off the event loop
                key = await asyncio.to_thread(video_key, image.resized, self._video_settings, self.model_id)
            else:  # keyed in its decode thread
                key = image.key
            ref = self.cache.get(key)
            if ref is None:
                self.metrics.inc("splitvl_embedding_cache_misses_total")
                try:
                    ref = await self._encode(image, transfer, key)
                except EncoderUnavailableError:
                    # The dead replica may hold this request's earlier encodes too: drop them
                    # so that the retry re-encodes instead of reusing their lost results.
                    for done in keys:
                        self.cache.pop(done)
                    raise
                nbytes = ref.nbytes if isinstance(ref, ImagePixels) else self._embedding_bytes(num_tokens)
                self.cache.put(key, ref, nbytes)
                self.metrics.set("splitvl_embedding_cache_bytes", self.cache.nbytes)
            else:
                self.metrics.inc("splitvl_embedding_cache_hits_total")
            refs.append(ref)
            keys.append(key)
        return refs, keys

    async def _encode(self, image: LoadedImage | PreparedVideo, transfer: str, key: str) -> Any:
        """Send one image or video (`key`: its cache key) to the vision replica; with the tower in the
        engine process, what goes there instead (`ImagePixels`)."""
        # The uint8 pixels at the patch grid's size (not float patches) go to the vision replica.
        if isinstance(image, PreparedVideo):
            pixels, grid = image.resized.numpy(), tuple(image.grid_thw)  # [T, h, w, 3]: sampled and resized
        else:
            pixels, grid = image.pixels, image.grid_thw
            if pixels is None:  # its cache entry was gone by now
                pixels = await asyncio.to_thread(self._pixels_again, image)
        if isinstance(self.vision, EngineTower):  # the engine process' tower (vision.colocate_llm, engine_process)
            return self.vision.pixels(pixels, grid, key)
        if isinstance(self.vision, VisionEncoder):  # this replica's own tower (vision.colocate_llm)
            task = asyncio.ensure_future(self.vision.encode(pixels, transfer))
            task.add_done_callback(_retrieve_exception)  # the LLM side may never await it (request gone)
            return task
        response = self.vision.encode.remote(pixels, transfer)
        try:
            # Only waits for a replica to take the call; the result stays remote.
            return await response._to_object_ref()
        except Exception as exc:
            if is_replica_death(exc):
                raise EncoderUnavailableError(f"the vision replica died ({type(exc).__name__})") from None
            raise

    def _pixels_again(self, image: LoadedImage) -> np.ndarray:
        """The tower's pixels of an image prepared as a cache hit whose entry is gone: resized from
        its decoded image, or decoded from its bytes first."""
        decoded = image.image if image.image is not None else decode_image(image.data, self.policy)
        return self.processor.resize(decoded)

    def _embedding_bytes(self, num_tokens: int) -> int:
        vision = self.model_config.vision
        layers = 1 + len(vision.deepstack_visual_indexes)
        dtype = resolve_dtype(self.config.dtype, self.config.resolved_device())
        return num_tokens * vision.out_hidden_size * layers * _DTYPE_BYTES[dtype]

    async def _generate(
        self, prompts: list[list[int]], sampling: list[SamplingParams], refs: list[Any], keys: list[str],
        stop: list[str] | None, start: float,
    ) -> AsyncIterator[RouterEvent]:
        """One LLM call per choice, their deltas interleaved as they come; `Usage` last.

        `sampling` holds n choices per prompt, prompt by prompt: choice i reads `prompts[i // n]`.
        """
        rid = uuid.uuid4().hex
        self.metrics.observe("splitvl_router_preprocess_seconds", time.monotonic() - start, FINE_LATENCY_BUCKETS)
        per_prompt = len(sampling) // len(prompts)
        prompt_tokens = sum(len(ids) for ids in prompts)
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.create_task(
                self._run_choice(f"{rid}-{i}", i, prompts[i // per_prompt], params, refs, keys, stop, queue)
            )
            for i, params in enumerate(sampling)
        ]
        completion_tokens = 0
        first_token_at: float | None = None
        last_token_at = start
        try:
            # `Start` waits for the LLM's first delta, so that failures before
            # any token (overload, lost embeddings, a dead replica, a prompt over
            # the context) still reach the client as an HTTP status rather than
            # an in-band stream error.
            pending = [await queue.get()]
            if not isinstance(pending[0], BaseException):
                yield Start(prompt_tokens=prompt_tokens)
            done = 0
            while done < len(sampling):
                event = pending.pop() if pending else await queue.get()
                if isinstance(event, BaseException):
                    for key in keys:  # a failed encode must not stay cached
                        self.cache.pop(key)
                    raise event
                if isinstance(event, _ChoiceDone):
                    completion_tokens += event.num_tokens
                    done += 1
                    continue
                event = _merge_waiting_deltas(event, queue, pending)
                now = time.monotonic()
                if first_token_at is None:
                    first_token_at = now
                    self.metrics.observe("splitvl_time_to_first_token_seconds", now - start)
                else:
                    self.metrics.observe("splitvl_inter_token_latency_seconds", now - last_token_at)
                last_token_at = now
                yield event
        finally:
            for task in tasks:
                task.cancel()
        self.metrics.inc("splitvl_prompt_tokens_total", prompt_tokens)
        self.metrics.inc("splitvl_generation_tokens_total", completion_tokens)
        yield Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    async def _run_choice(
        self, request_id: str, index: int, ids: list[int], sampling: SamplingParams,
        refs: list[Any], keys: list[str], stop: list[str] | None, queue: asyncio.Queue,
    ) -> None:
        """Stream one choice from the LLM into `queue`: `ChoiceDelta`s, then `_ChoiceDone` (or an error)."""
        detok = IncrementalDetokenizer(self.tokenizer, stop, prompt_tail=ids[-8:])
        sent = time.monotonic()
        stream = self.llm.stream(request_id, ids, sampling, refs or None, keys or None)
        finished = engine_done = False
        try:
            out: TokenDelta
            async for out in stream:
                if out.server_s is not None:
                    self.metrics.observe("splitvl_llm_call_overhead_seconds",
                                         max(0.0, time.monotonic() - sent - out.server_s), FINE_LATENCY_BUCKETS)
                reason = out.finish_reason
                engine_done = reason is not None
                if reason in ("error", "abort"):
                    raise InternalServerError(f"the engine ended the request: {out.error or reason}")
                delta = detok.add(list(out.token_ids), final=reason is not None)
                if delta.stopped:
                    reason = "stop"
                logprobs = self._logprobs(out, len(out.token_ids))
                if delta.text or reason is not None or logprobs:
                    await queue.put(ChoiceDelta(index, delta.text, logprobs, reason))
                if reason is not None:
                    finished = True
                    break
            if not finished:
                raise InternalServerError("the LLM stream ended without a finish reason")
            await queue.put(_ChoiceDone(index, detok.num_tokens))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(as_api_error(exc))
        finally:
            if not engine_done:  # cancelled, failed or stopped by a stop string: abort it
                stream.cancel()

    def _logprobs(self, out: TokenDelta, num_new: int) -> tuple[TextLogprob, ...] | None:
        """The engine's logprobs of the delta's tokens, decoded."""
        if not out.logprobs or not num_new:
            return None

        def text(token_id: int) -> str:
            return self.tokenizer.decode([int(token_id)])

        return tuple(
            TextLogprob(text(lp.token_id), float(lp.logprob),
                        tuple((text(t), float(v)) for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)))
            for lp in out.logprobs[-num_new:]
        )


def _retrieve_exception(task: asyncio.Future) -> None:
    """Mark an in-process encode's failure as seen: its waiters, if any, get it themselves."""
    if not task.cancelled():
        task.exception()


def _merge_waiting_deltas(event: ChoiceDelta, queue: asyncio.Queue, pending: list) -> ChoiceDelta:
    """Fold the deltas of the same choice already waiting in `queue` into `event`.

    Under load the stream to the client lags the engine; an SSE chunk per waiting
    delta would only add to the lag. Anything else goes back to `pending`.
    """
    while event.finish_reason is None and not queue.empty():
        nxt = queue.get_nowait()
        if not isinstance(nxt, ChoiceDelta) or nxt.index != event.index:
            pending.append(nxt)
            break
        logprobs = None
        if event.logprobs is not None or nxt.logprobs is not None:
            logprobs = (event.logprobs or ()) + (nxt.logprobs or ())
        event = ChoiceDelta(event.index, event.text + nxt.text, logprobs, nxt.finish_reason)
    return event
