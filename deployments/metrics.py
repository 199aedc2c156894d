"""Prometheus metrics of every replica, gathered for the ingress's `/metrics`.

Each replica owns a `MetricsRecorder` (counters, gauges, histograms keyed by
name + labels). Recorders push their snapshot to one `MetricsHub` actor per
Serve application (named after the app, created on first use), shortly after a
change; the ingress renders all snapshots in the Prometheus text format, one
series per replica (`deployment`, `replica` labels). A dead replica's last
snapshot stays, so counters summed over replicas never go backwards.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

logger = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]

DEFAULT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Millisecond resolution where the serving overhead targets live (bench/serve.py reads these).
FINE_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
                        0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Each metric's `# HELP` line; its `# TYPE` is how the replica records it (inc, set, observe).
HELP: dict[str, str] = {
    "splitvl_requests_total": "HTTP requests by route and status code.",
    "splitvl_time_to_first_token_seconds": "Time from request to first token.",
    "splitvl_inter_token_latency_seconds": "Time between streamed tokens.",
    "splitvl_embedding_cache_hits_total": "Images whose embeddings came from the cache.",
    "splitvl_embedding_cache_misses_total": "Images sent to the vision encoder.",
    "splitvl_embedding_cache_bytes": "Bytes of embeddings referenced by the cache.",
    "splitvl_engine_time_to_first_token_seconds": (
        "LLM replica: engine.add_request to the first token (queueing + prefill)."
    ),
    "splitvl_llm_embedding_wait_seconds": "LLM replica: waiting for a request's image embeddings (encode + transfer).",
    "splitvl_ingress_body_read_seconds": "Ingress: reading a request's body (Serve fetches it from the proxy).",
    "splitvl_ingress_time_to_first_chunk_seconds": (
        "Ingress: a streaming request's arrival in the replica to its first content chunk."
    ),
    "splitvl_router_preprocess_seconds": (
        "Router: a request's arrival to its LLM call (template, tokenize, images, encode calls)."
    ),
    "splitvl_llm_call_overhead_seconds": (
        "Router: the LLM call to its first streamed item, less the LLM replica's own time."
    ),
    "splitvl_vision_encode_retries_total": (
        "Requests re-encoded and retried once because a vision replica died holding their images."
    ),
    "splitvl_vision_images_total": "Images encoded by a vision replica.",
    "splitvl_vision_ipc_images_total": "Images whose embeddings left through the CUDA IPC pool.",
    "splitvl_vision_batches_total": "Vision tower calls.",
    "splitvl_vision_batch_size": "Images per vision tower call.",
    "splitvl_vision_encode_seconds": "Time of one vision tower call.",
    "splitvl_kv_cache_usage": "Fraction of KV blocks in use.",
    "splitvl_num_requests_running": "Sequences the engine is running.",
    "splitvl_num_requests_waiting": "Sequences queued in the engine.",
    "splitvl_generation_tokens_total": "Tokens generated.",
    "splitvl_prompt_tokens_total": "Prompt tokens processed.",
}


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


class MetricsRecorder:
    """One replica's metrics; `snapshot()` is plain data, `start_pushing` ships it."""

    def __init__(self, deployment: str, replica: str, app_name: str | None = None):
        """`app_name`: the Serve application whose hub gets the snapshots (None: outside Serve, none)."""
        self.deployment = deployment
        self.replica = replica
        self.app_name = app_name
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._histograms: dict[tuple[str, Labels], Histogram] = {}
        self._dirty = asyncio.Event() if _in_loop() else None
        self._hub: Any = None
        self._push_task: asyncio.Task | None = None
        self._push_started = False

    @classmethod
    def for_replica(cls, default_deployment: str) -> MetricsRecorder:
        """The recorder of the Serve replica this runs in (outside Serve: no app, a random id)."""
        try:
            from ray import serve

            ctx = serve.get_replica_context()
            return cls(ctx.deployment, ctx.replica_id.unique_id, ctx.app_name)
        except Exception:  # outside a replica (unit tests)
            return cls(default_deployment, uuid.uuid4().hex[:8])

    def inc(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        key = (name, _labels(labels))
        self._counters[key] = self._counters.get(key, 0.0) + value
        self._mark()

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self._gauges[(name, _labels(labels))] = float(value)
        self._mark()

    def observe(
        self, name: str, value: float, buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS,
        labels: dict[str, str] | None = None,
    ) -> None:
        key = (name, _labels(labels))
        hist = self._histograms.get(key)
        if hist is None:
            hist = self._histograms[key] = Histogram(buckets)
        hist.observe(value)
        self._mark()

    def _mark(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    def snapshot(self) -> dict[str, Any]:
        base = {"deployment": self.deployment, "replica": self.replica}
        return {
            "base": base,
            "counters": [(n, lb, v) for (n, lb), v in self._counters.items()],
            "gauges": [(n, lb, v) for (n, lb), v in self._gauges.items()],
            "histograms": [
                (n, lb, h.buckets, list(h.counts), h.total, h.count) for (n, lb), h in self._histograms.items()
            ],
        }

    def start_pushing(self, interval_s: float = 0.2) -> None:
        """Push the snapshot to the app's hub whenever it changed (at most every interval).

        Needs a running event loop, so replicas call it on every request: only the
        first call does anything (a hub that cannot be reached is not retried).
        """
        if self._push_started or self.app_name is None:
            return
        self._push_started = True
        if self._dirty is None:
            self._dirty = asyncio.Event()
        try:
            self._hub = MetricsHub.options(
                name=hub_name(self.app_name), namespace="serve", get_if_exists=True,
                lifetime="detached", num_cpus=0,
            ).remote()
        except Exception as exc:  # metrics must never take a replica down
            logger.warning("metrics hub unavailable: %s", exc)
            return
        self._push_task = asyncio.get_running_loop().create_task(self._push_loop(interval_s))

    async def _push_loop(self, interval_s: float) -> None:
        self._dirty.set()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._hub.push.remote(self.replica, self.snapshot())
            except Exception as exc:
                logger.warning("metrics push failed: %s", exc)
            await asyncio.sleep(interval_s)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def hub_name(app_name: str) -> str:
    return f"splitvl-metrics-{app_name}"


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsHub:
    """Latest snapshot of every replica of one application."""

    def __init__(self) -> None:
        self._snapshots: dict[str, dict[str, Any]] = {}

    def push(self, replica: str, snapshot: dict[str, Any]) -> None:
        self._snapshots[replica] = snapshot

    def collect(self) -> list[dict[str, Any]]:
        return list(self._snapshots.values())


def _fmt_labels(base: dict[str, str], labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = list(base.items()) + list(labels) + list(extra)
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in items)
    return "{" + ",".join(escaped) + "}"


def _fmt_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render_prometheus(snapshots: list[dict[str, Any]]) -> str:
    """Snapshots -> Prometheus text exposition format (version 0.0.4)."""
    lines: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for snap in snapshots:
        base = snap["base"]
        for kind in ("counter", "gauge"):
            for name, labels, value in snap[f"{kind}s"]:
                kinds[name] = kind
                lines.setdefault(name, []).append(f"{name}{_fmt_labels(base, labels)} {_fmt_value(value)}")
        for name, labels, buckets, counts, total, count in snap["histograms"]:
            kinds[name] = "histogram"
            out = lines.setdefault(name, [])
            running = 0
            for bound, c in zip((*buckets, math.inf), counts, strict=True):
                running += c
                le = (("le", _fmt_value(bound)),)
                out.append(f"{name}_bucket{_fmt_labels(base, labels, le)} {running}")
            out.append(f"{name}_sum{_fmt_labels(base, labels)} {_fmt_value(total)}")
            out.append(f"{name}_count{_fmt_labels(base, labels)} {count}")
    text = []
    for name in sorted(lines):
        text.append(f"# HELP {name} {HELP.get(name, name)}")
        text.append(f"# TYPE {name} {kinds[name]}")
        text.extend(lines[name])
    return "\n".join(text) + "\n"


def prometheus_samples(text: str) -> Iterator[tuple[str, str, float]]:
    """(series name, its label text between the braces, value) of every sample of a Prometheus text page."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        yield name, labels.removesuffix("}"), float(value)


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum every sample of each series name (labels dropped): a test/ops helper."""
    totals: dict[str, float] = {}
    for name, _, value in prometheus_samples(text):
        totals[name] = totals.get(name, 0.0) + value
    return totals
