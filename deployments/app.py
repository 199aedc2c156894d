"""`build_app(args) -> serve.Application`: OpenAIIngress(VisionEncoder?, LLMServer).

The one graph: each ingress replica holds its own router (deployments/router.py),
which calls the VisionEncoder and LLMServer deployments through their handles.
With `llm.colocate_ingress` there is no LLMServer deployment: each ingress
replica owns an engine (an `LLMServer` body) and takes the LLM's replica count,
resources and queue bounds, so tokens reach the HTTP stream without a Serve hop;
with `vision.colocate_llm` too there is no VisionEncoder deployment either: each
ingress replica runs its own vision tower beside its engine, on one GPU share.

Usable as `import_path: deployments.app:build_app` in a Serve config, whose
`args:` is an `AppConfig` dict. Building validates the config and decides the
task (no vision deployment for text-only models or `disable_vision_encoder`);
it writes nothing and loads no weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ray import serve

from deployments.config import AppConfig, needs_vision
from deployments.llm import LLMServer
from deployments.openai_api import IngressDeployment
from deployments.vision import VisionEncoder


# Ray Serve switches read by each replica process when it imports Serve. Serve's defaults run
# a replica's code on a second event loop in its own thread and a handle's router on a third:
# every request and every streamed item then crosses threads (and the GIL) in the caller and
# in the callee. On one loop, the text-only Ray overhead (HTTP TTFT - engine TTFT, c=1, HAProxy;
# medians of 12 vs 9 runs, tiny Qwen3-VL on the 2-core CPU box) went 13.2 -> 10.1 ms p50: outside
# the ingress 4.9 -> 3.3 ms (HAProxy's direct ingress serves HTTP on the replica's main loop), the
# LLM call's hops 7.1 -> 5.9 ms. Safe here: every replica's blocking work runs off its loop (the
# engine's step thread, the vision tower in `asyncio.to_thread`, image decode and resize in worker threads),
# and replicas call handles only from async code (a handle whose router runs on the current
# loop cannot be used outside one, hence per replica and not in `ray start`'s environment).
REPLICA_SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def replica_env() -> dict[str, str]:
    """`REPLICA_SERVE_ENV`, where a value set in the environment that builds the app wins
    (the Serve app's `runtime_env`, the shell of `serve run`): `=1` restores Serve's default."""
    return {key: os.environ.get(key, value) for key, value in REPLICA_SERVE_ENV.items()}


def with_replica_env(options: dict[str, Any]) -> dict[str, Any]:
    """Deployment options with `replica_env()` added to the replica actor's `runtime_env`
    (Serve merges it with the app's; these keys win)."""
    actor = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **replica_env()}
    return {**options, "ray_actor_options": {**actor, "runtime_env": runtime_env}}


def vision_options(config: AppConfig) -> dict[str, Any]:
    vision = config.vision
    opts = vision.scaling_options()
    opts["ray_actor_options"] = {"num_cpus": vision.num_cpus, "num_gpus": vision.num_gpus}
    # A batch is only as big as the requests a replica is allowed to hold.
    opts["max_ongoing_requests"] = max(opts["max_ongoing_requests"], vision.max_batch_size)
    # A dead replica is replaced after a failed health check; check often.
    opts["health_check_period_s"] = 2.0
    opts["health_check_timeout_s"] = 30.0
    return opts


def ingress_options(config: AppConfig) -> dict[str, Any]:
    """Replicas, resources and queue bounds of the ingress: no unbounded queue in front of the LLM.

    The bounds hold at least what the LLM deployment admits, so overload is normally
    refused by the LLM's bounded queue (a 503 envelope from the router); the
    ingress' own queue bound is the last resort (Serve's proxy answers 503).
    """
    llm = config.llm
    replicas = llm.autoscaling_config.max_replicas if llm.autoscaling_config else (llm.num_replicas or 1)
    queued = llm.max_queued_requests
    ongoing = max(64, replicas * llm.max_ongoing_requests + max(queued, 0))
    # Requests wait in a handle's queue briefly even when replicas have room
    # (while it picks one), so the front queue bound is generous, not tight.
    return {
        "num_replicas": config.ingress_replicas,
        "ray_actor_options": {"num_cpus": 0.1},
        "max_ongoing_requests": ongoing,
        "max_queued_requests": ongoing if queued >= 0 else -1,
    }


# Requests a colocated ingress replica takes beyond the LLM's max_ongoing_requests: /metrics, /v1/models
# and health probes must not wait behind a full engine.
CONTROL_REQUESTS = 8


def colocated_ingress_options(config: AppConfig) -> dict[str, Any]:
    """The ingress of `llm.colocate_ingress`: the LLM replicas' count, resources and health checks.

    The LLM's bounds (`max_ongoing_requests` in the engine, `max_queued_requests` waiting, then the
    router's 503 envelope) are applied in the replica (`deployments.llm_client.LocalLLM`), so Serve
    lets that many in, plus room for control requests. Serve's own queue in front is generous, as
    `ingress_options`' (a request waits there briefly even when the replica has room): the last resort.
    """
    llm = config.llm
    opts = LLMServer.deployment_options(config)
    ongoing = llm.max_ongoing_requests + max(llm.max_queued_requests, 0) + CONTROL_REQUESTS
    opts["max_ongoing_requests"] = ongoing
    opts["max_queued_requests"] = ongoing if llm.max_queued_requests >= 0 else -1
    return opts


def build_app(args: dict[str, Any]) -> serve.Application:
    """Validate `args` (an AppConfig dict) and bind the deployment graph.

    Serve calls this with the config's `args` (builders take exactly one argument).
    Raises:
        pydantic.ValidationError naming the bad field.
    """
    return bind_app(AppConfig.model_validate(args))


def bind_app(config: AppConfig, engine_cls: type | None = None) -> serve.Application:
    """Bind OpenAIIngress(VisionEncoder?, LLMServer) for a validated config.

    Args:
        engine_cls: engine class for the LLM replicas (default `engine.Engine`; tests inject one).
    """
    # Plain JSON dict: every replica re-validates it, and it pickles anywhere.
    raw = json.loads(config.model_dump_json(by_alias=False))
    vision_app = None
    if needs_vision(config) and not config.vision.colocate_llm:  # colocated: each ingress replica builds its own
        vision_opts = with_replica_env(vision_options(config))
        vision = serve.deployment(VisionEncoder, name="VisionEncoder").options(**vision_opts)
        vision_app = vision.bind(raw)
    if config.llm.colocate_ingress:
        ingress_opts = with_replica_env(colocated_ingress_options(config))
        ingress = serve.deployment(IngressDeployment, name="OpenAIIngress").options(**ingress_opts)
        return ingress.bind(raw, vision_app, None, engine_cls)
    llm_options = with_replica_env(LLMServer.deployment_options(config))
    llm = serve.deployment(LLMServer, name="LLMServer").options(**llm_options)
    llm_app = llm.bind(raw, engine_cls) if engine_cls is not None else llm.bind(raw)
    ingress_opts = with_replica_env(ingress_options(config))
    ingress = serve.deployment(IngressDeployment, name="OpenAIIngress").options(**ingress_opts)
    return ingress.bind(raw, vision_app, llm_app)


def engine_deployment(app_name: str) -> str:
    """The deployment of a running app whose replicas own the engines (stats, timeline):
    LLMServer, or the ingress when `llm.colocate_ingress` built none."""
    names = serve.status().applications[app_name].deployments
    return "LLMServer" if "LLMServer" in names else "OpenAIIngress"
