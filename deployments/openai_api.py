"""The HTTP ingress: an OpenAI-compatible FastAPI app inside a Serve deployment.

Routes: POST /v1/chat/completions and /v1/completions (stream and not),
GET /v1/models, /health, /metrics. Bodies are read with a byte cap (413) and
validated here; the Router does the rest. Every error leaves as the OpenAI
envelope `{"error": {"message", "type", "param", "code"}}` with its status,
never a traceback. An optional API key guards /v1/* (constant-time compare).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import AppConfig
from deployments.errors import (
    APIError,
    AuthenticationError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceUnavailableError,
    pydantic_error_to_api,
)
from deployments.metrics import FINE_LATENCY_BUCKETS, MetricsRecorder, hub_name, render_prometheus
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    models_response,
    new_id,
    usage_dict,
)
from deployments.router import replica_identity

logger = logging.getLogger(__name__)


def as_api_error(exc: BaseException) -> APIError:
    """Any failure on the request path -> the APIError to answer with."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, APIError):
        return cause
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TimeoutError):
        return RequestTimeoutError("the request took longer than the deployment's request_timeout_s")
    name = type(exc).__name__
    if "BackPressure" in name:
        return ServiceUnavailableError("the server is overloaded; retry later", code="overloaded")
    if any(k in name for k in ("ActorDied", "ActorUnavailable", "DeploymentUnavailable", "ActorError")):
        return ServiceUnavailableError(f"a replica is unavailable ({name}); retry the request")
    logger.error("request failed: %s: %s", name, exc)
    return InternalServerError("internal error")


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
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"malformed JSON body: {exc}") from None


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class LocalStream:
    """A router generator in this process, with the streaming handle's `cancel()`."""

    def __init__(self, events: AsyncIterator[dict[str, Any]]):
        self._events = events
        self._closing: asyncio.Task | None = None

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._events.__anext__()

    def cancel(self) -> None:
        """Close the generator (its `finally` aborts the LLM request), as a remote cancel would."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._events.aclose())


class OpenAIIngress:
    """Serve deployment body (wrapped with `serve.ingress()` in app.py)."""

    def __init__(self, app_config: dict[str, Any], router: Any, vision: Any | None = None, llm: Any | None = None):
        """`router`: a Router deployment's handle; None builds the router in this process
        (`router_in_ingress`), over the `vision` and `llm` handles."""
        self.config = AppConfig.model_validate(app_config)
        self.model_id = self.config.served_model_id
        self.api_key = self.config.resolved_api_key()
        self.limits = self.config.limits
        self.created = int(time.time())
        app, deployment, replica = replica_identity("OpenAIIngress")
        self.metrics = MetricsRecorder(deployment, replica)
        self._app_name = app
        self._metrics_task: asyncio.Task | None = None
        self.router = router
        self.local_router = None
        if router is None:
            from deployments.router import Router

            self.local_router = Router(app_config, vision, llm, metrics=self.metrics)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self)

    def debug_state(self) -> dict[str, Any]:
        """The in-process router's `debug_state` (with `router_in_ingress`)."""
        if self.local_router is None:
            raise RuntimeError("the router is a deployment of its own here: ask it")
        return self.local_router.debug_state()

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
            hub = ray.get_actor(hub_name(self._app_name), namespace="serve")
            others = await hub.collect.remote()
            snapshots += [s for s in others if s["base"]["replica"] != self.metrics.replica]
        except ValueError:
            pass  # no replica has pushed yet
        return render_prometheus(snapshots)

    async def open_stream(self, method: str, request: Any) -> tuple[Any, dict[str, Any], float]:
        """Start the router call and wait for its "start" event (errors surface here)."""
        if self._metrics_task is None:
            self._metrics_task = self.metrics.start_pushing(self._app_name) or asyncio.sleep(0)
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout_s
        if self.local_router is not None:
            stream = LocalStream(getattr(self.local_router, method)(request))
        else:
            stream = getattr(self.router, method).options(stream=True).remote(request)
        try:
            async with asyncio.timeout_at(deadline):
                first = await stream.__anext__()
        except BaseException:
            stream.cancel()
            raise
        return stream, first, deadline

    async def collect(self, stream: Any, n: int, deadline: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
        choices = [{"index": i, "text": "", "finish_reason": None, "logprobs": None} for i in range(n)]
        usage: dict[str, int] = {}
        try:
            async with asyncio.timeout_at(deadline):
                async for event in stream:
                    if event["kind"] == "usage":
                        usage = usage_dict(event["prompt_tokens"], event["completion_tokens"])
                        continue
                    choice = choices[event["index"]]
                    choice["text"] += event["text"]
                    choice["finish_reason"] = event["finish_reason"] or choice["finish_reason"]
                    if event.get("logprobs"):
                        choice.setdefault("_lp", []).extend(event["logprobs"])
        except BaseException:
            stream.cancel()
            raise
        return choices, usage

    async def start(self, chat: bool, body: Any) -> tuple[ChatCompletionRequest | CompletionRequest, Any, float]:
        """Validate a request body, check its model and open its router stream: (request, stream, deadline)."""
        schema = ChatCompletionRequest if chat else CompletionRequest
        try:
            req = schema.model_validate(body)
        except ValidationError as exc:
            raise pydantic_error_to_api(exc) from None
        self.check_model(req.model)
        stream, _, deadline = await self.open_stream("chat" if chat else "complete", req)
        return req, stream, deadline

    async def answer(self, stream: Any, req: Any, chat: bool, rid: str, deadline: float) -> dict[str, Any]:
        """The non-streaming response object of an opened stream (chat.completion / text_completion)."""
        choices, usage = await self.collect(stream, req.n, deadline)
        for c in choices:
            lp = c.pop("_lp", None)
            if lp:
                c["logprobs"] = {"content": lp} if chat else _completion_logprobs(lp)
        build = chat_response if chat else completion_response
        return build(rid, self.model_id, choices, usage)

    async def respond(self, chat: bool, body: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) that POST /v1/chat/completions (`chat`) or /v1/completions
        answers for `body`, without HTTP or auth: the batch job calls this through a handle.

        A streaming request is answered as a non-streaming one.
        """
        try:
            as_unary = {**body, "stream": False} if isinstance(body, dict) else body
            req, stream, deadline = await self.start(chat, as_unary)
            return 200, await self.answer(stream, req, chat, new_id("chatcmpl" if chat else "cmpl"), deadline)
        except Exception as exc:  # every failure is an envelope, as over HTTP
            err = as_api_error(exc)
            return err.status, err.body()

    async def stream_events(
        self, stream: Any, deadline: float, chunk: Any, include_usage: bool, chat: bool, arrived: float,
    ) -> AsyncIterator[str]:
        """SSE lines from router events; an error mid-stream becomes an error event.

        `arrived`: when the request reached this replica (for the first-chunk histogram).
        """
        first = True
        if chat:
            yield sse(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]))
        try:
            async with asyncio.timeout_at(deadline):
                async for event in stream:
                    if event["kind"] == "usage":
                        if include_usage:
                            usage = usage_dict(event["prompt_tokens"], event["completion_tokens"])
                            yield sse(chunk([], usage))
                        continue
                    lp = {"content": event["logprobs"]} if chat and event.get("logprobs") else None
                    body = ({"delta": {"content": event["text"]}} if chat else {"text": event["text"]})
                    yield sse(chunk([{"index": event["index"], **body, "logprobs": lp,
                                      "finish_reason": event["finish_reason"]}]))
                    if first:
                        first = False
                        self.metrics.observe("splitvl_ingress_time_to_first_chunk_seconds",
                                             time.monotonic() - arrived, FINE_LATENCY_BUCKETS)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except BaseException as exc:  # headers are sent: report in-band
            stream.cancel()
            yield sse(as_api_error(exc).body())
        yield "data: [DONE]\n\n"


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

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - becomes the envelope
            response = error_response(as_api_error(exc))
        ingress.metrics.inc("splitvl_requests_total", labels={"route": request.url.path,
                                                              "status": str(response.status_code)})
        return response

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
            req, stream, deadline = await ingress.start(chat, body)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return error_response(as_api_error(exc))
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        if req.stream:
            make = chat_chunk if chat else completion_chunk

            def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
                return make(rid, ingress.model_id, created, choices, usage)

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                ingress.stream_events(stream, deadline, chunk, include_usage, chat, arrived),
                media_type="text/event-stream",
            )
        try:
            return JSONResponse(await ingress.answer(stream, req, chat, rid, deadline))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return error_response(as_api_error(exc))

    return app


def _completion_logprobs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Chat-style logprob items -> the legacy completions `logprobs` object."""
    offsets, pos = [], 0
    for item in items:
        offsets.append(pos)
        pos += len(item["token"])
    return {
        "tokens": [i["token"] for i in items],
        "token_logprobs": [i["logprob"] for i in items],
        "top_logprobs": [{t["token"]: t["logprob"] for t in i["top_logprobs"]} for i in items],
        "text_offset": offsets,
    }


IngressDeployment = serve.ingress()(OpenAIIngress)
