"""The HTTP ingress: an OpenAI-compatible FastAPI app inside a Serve deployment.

Routes: POST /v1/chat/completions and /v1/completions (stream and not),
GET /v1/models, /health, /metrics. Bodies are read with a byte cap (413) and
validated here; the replica's own `Router` (built over the vision and LLM
handles, no Serve hop between them) does the rest. Every error leaves as the
OpenAI envelope `{"error": {"message", "type", "param", "code"}}` with its
status, never a traceback. An optional API key guards /v1/* (constant-time
compare). `chat` serves the batch job through a deployment handle.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import AppConfig, ensure_checkpoint, needs_vision
from deployments.errors import (
    APIError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    as_api_error,
    pydantic_error_to_api,
)
from deployments.messages import ChoiceDelta, RouterEvent, Usage
from deployments.metrics import FINE_LATENCY_BUCKETS, MetricsRecorder, hub_name, render_prometheus
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    choice_dict,
    completion_object,
    loads_request,
    models_response,
    new_id,
)
from deployments.llm import LLMServer
from deployments.llm_client import HandleLLM, LLMClient, LocalLLM
from deployments.pixel_inputs import EngineTower
from deployments.router import Router
from deployments.vision import VisionEncoder
from models.config import load_model_config

logger = logging.getLogger(__name__)


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, refusing more than `limit` bytes (413) before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise InvalidRequestError(f"content type must be application/json, got {ctype!r}")
    try:
        return loads_request(body)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


Events = AsyncIterator[RouterEvent]


class OpenAIIngress:
    """Serve deployment body (wrapped with `serve.ingress()` below); holds this replica's Router."""

    def __init__(self, app_config: dict[str, Any], vision: Any | None, llm: Any | None,
                 engine_cls: type | None = None):
        """`vision` (None: no vision deployment), `llm`: the deployments' handles, for the router.

        `llm` None (`llm.colocate_ingress`): this replica owns the engine, an `LLMServer` body built
        here (`engine_cls` as `LLMServer` takes it), and the router streams from it in-process; with
        `vision.colocate_llm` it owns the vision tower too: an in-process `VisionEncoder`, or with
        `llm.engine_process` the engine process' own (the router hands it resized pixels: `EngineTower`).
        """
        self.config = AppConfig.model_validate(app_config)
        self.model_id = self.config.served_model_id
        self.api_key = self.config.resolved_api_key()
        self.limits = self.config.limits
        self.created = int(time.time())
        self.metrics = MetricsRecorder.for_replica("OpenAIIngress")
        self.llm_server: LLMServer | None = None
        if llm is None:
            self.llm_server = LLMServer(app_config, engine_cls, metrics=self.metrics)
            llm_config = self.config.llm
            client: LLMClient = LocalLLM(self.llm_server, llm_config.max_ongoing_requests,
                                         llm_config.max_queued_requests)
        else:
            client = HandleLLM(llm)
        self.vision: VisionEncoder | None = None
        if vision is None and llm is None and self.config.vision.colocate_llm and needs_vision(self.config):
            if self.config.llm.engine_process:  # the tower in the engine process
                vision = EngineTower(load_model_config(ensure_checkpoint(self.config)))
            else:  # the tower in this replica, beside its engine
                self.vision = vision = VisionEncoder(app_config, in_process=True, metrics=self.metrics)
        self.router = Router(app_config, vision, client, self.metrics)

    async def check_health(self) -> None:
        """Serve calls this periodically; with the engine in this replica, a dead engine restarts it."""
        if self.llm_server is not None:
            await self.llm_server.check_health()

    def stats(self) -> dict[str, Any]:
        """The in-process engine's `LLMServer.stats` (colocated only)."""
        return self._own_llm().stats()

    def timeline(self, since: int = 0) -> Any:
        """The in-process engine's step records, as `LLMServer.timeline` (colocated only)."""
        return self._own_llm().timeline(since)

    def vision_timeline(self, since: int = 0) -> Any:
        """The vision tower's calls in this replica (`VisionEncoder.timeline`) or in its engine process
        (`LLMServer.encode_timeline`); None without one (`vision.colocate_llm` off, or a text-only model)."""
        if self.vision is not None:
            return self.vision.timeline(since)
        return self.llm_server.encode_timeline(since) if self.llm_server is not None else None

    def _own_llm(self) -> LLMServer:
        if self.llm_server is None:
            raise RuntimeError("this ingress has no engine of its own (llm.colocate_ingress is off)")
        return self.llm_server

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self)

    def debug_state(self) -> dict[str, Any]:
        """The router's `debug_state`."""
        return self.router.debug_state()

    async def chat(self, request: ChatCompletionRequest) -> Events:
        """The router's events of one chat request, for deployment-handle callers (the batch job)."""
        self.metrics.start_pushing()
        async with aclosing(self.router.chat(request)) as events:
            async for event in events:
                yield event

    # ------------------------------------------------------------ helpers

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise AuthenticationError("invalid or missing API key (Authorization: Bearer <key>)")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise NotFoundError(f"model {model!r} does not exist; this server serves {self.model_id!r}", "model")

    async def metrics_text(self) -> str:
        import ray

        snapshots = [self.metrics.snapshot()]
        try:
            hub = ray.get_actor(hub_name(self.metrics.app_name), namespace="serve")
            others = await hub.collect.remote()
            snapshots += [s for s in others if s["base"]["replica"] != self.metrics.replica]
        except ValueError:
            pass  # no replica has pushed yet
        return render_prometheus(snapshots)

    async def open_stream(self, request: ChatCompletionRequest | CompletionRequest) -> tuple[Events, float]:
        """Start the router and wait for its `Start` (errors before it surface here); (events, deadline)."""
        self.metrics.start_pushing()
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout_s
        chat = isinstance(request, ChatCompletionRequest)
        events = self.router.chat(request) if chat else self.router.complete(request)
        try:
            async with asyncio.timeout_at(deadline):
                await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return events, deadline

    async def collect(self, events: Events, n: int, deadline: float) -> tuple[list[ChoiceDelta], Usage]:
        """The whole response: each choice's deltas joined into one, and the usage."""
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[Any]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        usage = Usage(0, 0)
        async with aclosing(events):
            async with asyncio.timeout_at(deadline):
                async for event in events:
                    if isinstance(event, Usage):
                        usage = event
                        continue
                    texts[event.index].append(event.text)
                    logprobs[event.index].extend(event.logprobs or ())
                    finish[event.index] = event.finish_reason or finish[event.index]
        choices = [ChoiceDelta(i, "".join(texts[i]), tuple(logprobs[i]) or None, finish[i]) for i in range(n)]
        return choices, usage

    async def start(self, chat: bool, body: Any) -> tuple[ChatCompletionRequest | CompletionRequest, Events, float]:
        """Validate a request body, check its model and open its router stream: (request, events, deadline)."""
        schema = ChatCompletionRequest if chat else CompletionRequest
        try:
            req = schema.model_validate(body)
        except ValidationError as exc:
            raise pydantic_error_to_api(exc) from None
        self.check_model(req.model)
        events, deadline = await self.open_stream(req)
        return req, events, deadline

    async def answer(
        self, events: Events, req: ChatCompletionRequest | CompletionRequest, chat: bool, rid: str, created: int,
        deadline: float,
    ) -> dict[str, Any]:
        """The non-streaming response object (chat.completion / text_completion) of an opened stream."""
        choices, usage = await self.collect(events, req.num_choices, deadline)
        body = [choice_dict(chat, False, c) for c in choices]
        return completion_object(chat, False, rid, self.model_id, created, body, usage)

    async def respond(self, chat: bool, body: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) that POST /v1/chat/completions (`chat`) or /v1/completions
        answers for `body`, without HTTP or auth: the batch job calls this through a handle.

        A streaming request is answered as a non-streaming one.
        """
        try:
            as_unary = {**body, "stream": False} if isinstance(body, dict) else body
            req, events, deadline = await self.start(chat, as_unary)
            rid = new_id("chatcmpl" if chat else "cmpl")
            return 200, await self.answer(events, req, chat, rid, int(time.time()), deadline)
        except Exception as exc:  # every failure is an envelope, as over HTTP
            err = as_api_error(exc)
            return err.status, err.body()

    async def stream_events(
        self, events: Events, deadline: float, chunk: Any, include_usage: bool, chat: bool, arrived: float,
    ) -> AsyncIterator[str]:
        """SSE lines from router events; an error mid-stream becomes an error event.

        `chunk(choices, usage)`: the chunk object; `arrived`: when the request reached
        this replica (for the first-chunk histogram).
        """
        first = True
        offsets: dict[int, int] = {}  # characters sent per choice (completions' text_offset)
        if chat:
            yield sse(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]))
        try:
            async with aclosing(events), asyncio.timeout_at(deadline):
                async for event in events:
                    if isinstance(event, Usage):
                        if include_usage:
                            yield sse(chunk([], event))
                        continue
                    offset = offsets.get(event.index, 0)
                    offsets[event.index] = offset + len(event.text)
                    yield sse(chunk([choice_dict(chat, True, event, offset)]))
                    if first:
                        first = False
                        self.metrics.observe("splitvl_ingress_time_to_first_chunk_seconds",
                                             time.monotonic() - arrived, FINE_LATENCY_BUCKETS)
        except (asyncio.CancelledError, GeneratorExit, TaskCancelledError):
            # The client left (the response task was cancelled, Serve cancelled the request's calls,
            # or the generator closed after a failed write); `aclosing` ends the router stream.
            # Yielding here would turn a hang-up into a traceback.
            raise
        except Exception as exc:  # headers are sent: report in-band
            yield sse(as_api_error(exc).body())
        yield "data: [DONE]\n\n"


class RequestCounter:
    """Pure ASGI middleware: counts requests by route and status; an escaped error becomes the envelope.

    Not starlette's `BaseHTTPMiddleware`: that one runs the app in a task group of its own
    and relays `receive`, so a client hanging up mid-stream surfaced as an `ExceptionGroup`
    traceback instead of the plain cancellation the stream already handles.
    """

    def __init__(self, app: Any, metrics: Any):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception as exc:  # noqa: BLE001 - becomes the envelope
            # Serve cancels a request whose client left: its calls raise TaskCancelledError.
            if isinstance(exc, (OSError, ClientDisconnect, TaskCancelledError)):
                logger.info("client disconnected from %s", scope["path"])
            elif status:  # headers are out: nothing more can be said to this client
                logger.warning("request %s failed after its response started: %s: %s", scope["path"],
                               type(exc).__name__, exc)
            else:
                await error_response(as_api_error(exc))(scope, receive, send_counted)
        finally:
            self.metrics.inc("splitvl_requests_total", labels={
                "route": scope["path"], "status": str(status[0]) if status else "499"})


def build_fastapi(ingress: OpenAIIngress) -> FastAPI:
    """The FastAPI app bound to one ingress replica (routes close over it)."""
    app = FastAPI(title="splitvl", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = NotFoundError(str(exc.detail), code="not_found") if exc.status_code == 404 else APIError(str(exc.detail))
        err.status = exc.status_code
        if exc.status_code == 405:
            err.type, err.code = "invalid_request_error", "method_not_allowed"
        return error_response(err)

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc))

    app.add_middleware(RequestCounter, metrics=ingress.metrics)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(await ingress.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        ingress.check_auth(request)
        return models_response(ingress.model_id, ingress.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completion(request, chat=False)

    async def _completion(request: Request, chat: bool) -> Response:
        arrived = time.monotonic()
        try:
            ingress.check_auth(request)
            body = await read_json(request, ingress.limits.max_request_bytes)
            ingress.metrics.observe("splitvl_ingress_body_read_seconds", time.monotonic() - arrived,
                                    FINE_LATENCY_BUCKETS)
            req, events, deadline = await ingress.start(chat, body)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return error_response(as_api_error(exc))
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        if req.stream:

            def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
                return completion_object(chat, True, rid, ingress.model_id, created, choices, usage)

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                ingress.stream_events(events, deadline, chunk, include_usage, chat, arrived),
                media_type="text/event-stream",
            )
        try:
            return JSONResponse(await ingress.answer(events, req, chat, rid, created, deadline))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return error_response(as_api_error(exc))

    return app


IngressDeployment = serve.ingress()(OpenAIIngress)
