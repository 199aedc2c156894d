"""Soak: N concurrent streaming image chats for M minutes against a splitvl Serve app.

    python -m bench.soak --config configs/demo.yaml --concurrency 8 --minutes 10 --json soak.json

Deploys the app of a Serve YAML (as `serve run` would) on a fresh local Ray
(dashboard on, for the state API) or on `--address`, then runs `concurrency`
clients, each sending streaming chat requests with one image (drawn from a
pool of distinct images, so the embedding cache both hits and evicts) through
the official `openai` client, back to back, for the whole duration.

Reports: requests, errors (with samples), TTFT and end-to-end latency
percentiles, the RSS of every Ray actor over time (pids from `ray.util.state`,
RSS from /proc) and each actor's growth after the warm-up, and the state at the
end, once the load has stopped: the LLM replica's KV blocks free vs total,
running/waiting requests, the router's embedding-cache bytes vs its budget.
`--check` exits 1 if there was any error, an actor grew more than
`--max-rss-growth-mib`, or anything was still held at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

APP_NAME = "splitvl-soak"


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def image_pool(count: int) -> list[str]:
    """`count` distinct PNG data URLs of a few sizes."""
    import PIL.Image

    urls = []
    for i in range(count):
        image = PIL.Image.new("RGB", (32 + 32 * (i % 3), 32 + 16 * (i % 4)), (i * 37 % 256, i * 11 % 256, 90))
        for x in range(16):  # a little structure, so images differ in more than colour
            image.putpixel((x, (x * (i + 1)) % image.height), (255 - x * 9, x * 13 % 256, i % 256))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a local process (Linux /proc), or None if it is not here."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def actor_rss(gcs_address: str) -> dict[str, int]:
    """RSS of every alive actor on this node, keyed by its name (or class and id)."""
    from ray.util.state import list_actors

    out: dict[str, int] = {}
    for actor in list_actors(address=gcs_address, filters=[("state", "=", "ALIVE")], limit=10_000):
        label = actor.name or f"{actor.class_name}#{actor.actor_id[:8]}"
        rss = rss_bytes(actor.pid) if actor.pid else None
        if rss is not None:
            out[label] = rss
    return out


def deploy(config_path: Path, address: str | None) -> tuple[str, Any]:
    """Start (or join) Ray and Serve, deploy the YAML's app; returns (base URL, AppConfig)."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppConfig, args_from_serve_yaml

    data = yaml.safe_load(config_path.read_text()) or {}
    args = args_from_serve_yaml(data)
    config = AppConfig.model_validate(args)
    env_vars: dict[str, str] = {}
    if "applications" in data:
        env_vars = {k: str(v) for k, v in
                    ((data["applications"][0].get("runtime_env") or {}).get("env_vars") or {}).items()}
    env_vars.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    os.environ.update(env_vars)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars})
    else:
        ray.init(include_dashboard=True, log_to_driver=False, runtime_env={"env_vars": env_vars})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}", config


async def client_loop(client: Any, model: str, images: list[str], offset: int, stride: int, max_tokens: int,
                      stop_at: float, records: list[dict[str, Any]]) -> None:
    i = offset
    while time.monotonic() < stop_at:
        image = images[i % len(images)]
        i += stride
        start = time.monotonic()
        record: dict[str, Any] = {"start": start}
        try:
            stream = await client.chat.completions.create(
                model=model, stream=True, max_tokens=max_tokens, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                                       {"type": "image_url", "image_url": {"url": image}}]}])
            reason = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and "ttft" not in record:
                    record["ttft"] = time.monotonic() - start
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
                if chunk.usage:
                    record["tokens"] = chunk.usage.completion_tokens
            if reason not in ("length", "stop"):
                record["error"] = f"stream ended without a finish reason ({reason})"
        except Exception as exc:  # every failure counts; the loop goes on
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        record["latency"] = time.monotonic() - start
        records.append(record)


async def sample_rss(gcs_address: str, every_s: float, t0: float, stop_at: float,
                     series: dict[str, list[tuple[float, float]]]) -> None:
    while True:
        now = time.monotonic()
        for label, rss in (await asyncio.to_thread(actor_rss, gcs_address)).items():
            series.setdefault(label, []).append((round(now - t0, 1), rss / 2**20))
        if now >= stop_at:
            return
        await asyncio.sleep(min(every_s, max(0.0, stop_at - now)))


def rss_growth(series: dict[str, list[tuple[float, float]]], warm_s: float) -> dict[str, float]:
    """MiB each actor gained from its first sample at or after `warm_s` to its last."""
    growth = {}
    for label, points in series.items():
        warm = [mib for t, mib in points if t >= warm_s]
        if len(warm) >= 2:
            growth[label] = round(warm[-1] - warm[0], 1)
    return growth


def end_state(app: str, settle_s: float = 30.0) -> dict[str, Any]:
    """Once idle: the LLM engine's KV blocks and queues, the router's embedding cache."""
    from ray import serve

    from deployments.app import engine_deployment

    llm = serve.get_deployment_handle(engine_deployment(app), app)
    deadline = time.monotonic() + settle_s
    while True:  # aborts of the last streams land a moment after the clients return
        stats = llm.stats.remote().result(timeout_s=30)
        if (stats["num_running"] == 0 and stats["num_waiting"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    router = serve.get_deployment_handle("OpenAIIngress", app).debug_state.remote().result(timeout_s=30)
    return {
        "kv_free_blocks": stats.get("num_free_blocks"), "kv_total_blocks": stats.get("num_total_blocks"),
        "num_running": stats["num_running"], "num_waiting": stats["num_waiting"],
        "num_preemptions": stats.get("num_preemptions"),
        "state_slots_free": stats.get("num_free_state_slots"), "state_slots_total": stats.get("num_total_state_slots"),
        "embedding_cache_entries": router["cache_entries"], "embedding_cache_bytes": router["cache_bytes"],
    }


async def soak(base_url: str, model: str, concurrency: int, duration_s: float, max_tokens: int,
               num_images: int, sample_s: float, gcs_address: str) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120.0)
    images = image_pool(num_images)
    records: list[dict[str, Any]] = []
    series: dict[str, list[tuple[float, float]]] = {}
    t0 = time.monotonic()
    stop_at = t0 + duration_s
    await asyncio.gather(
        sample_rss(gcs_address, sample_s, t0, stop_at, series),
        *(client_loop(client, model, images, k, concurrency, max_tokens, stop_at, records)
          for k in range(concurrency)),
    )
    series_end = await asyncio.to_thread(actor_rss, gcs_address)  # after the last in-flight request
    for label, rss in series_end.items():
        series.setdefault(label, []).append((round(time.monotonic() - t0, 1), rss / 2**20))
    wall = time.monotonic() - t0
    errors = [r["error"] for r in records if "error" in r]
    ok = [r for r in records if "error" not in r]
    return {
        "concurrency": concurrency, "duration_s": round(wall, 1), "requests": len(records),
        "errors": len(errors), "error_samples": sorted(set(errors))[:10],
        "requests_per_s": round(len(records) / wall, 2),
        "tokens_per_s": round(sum(r.get("tokens", 0) for r in ok) / wall, 1),
        "ttft_s": percentiles([r["ttft"] for r in ok if "ttft" in r]),
        "latency_s": percentiles([r["latency"] for r in ok]),
        "rss_mib": series,
    }


def check(report: dict[str, Any], max_growth_mib: float, cache_budget: int) -> list[str]:
    """What is wrong with a soak report (empty: it passed)."""
    problems = []
    if report["errors"]:
        problems.append(f"{report['errors']} errors: {report['error_samples'][:3]}")
    for label, mib in report["rss_growth_mib"].items():
        if mib > max_growth_mib:
            problems.append(f"{label} grew {mib} MiB (> {max_growth_mib})")
    end = report["end"]
    if end["kv_free_blocks"] != end["kv_total_blocks"]:
        problems.append(f"KV blocks still held: {end['kv_free_blocks']}/{end['kv_total_blocks']} free")
    if end["num_running"] or end["num_waiting"]:
        problems.append(f"requests still in the engine: {end['num_running']} running, {end['num_waiting']} waiting")
    if end["state_slots_free"] != end["state_slots_total"]:
        problems.append(f"state slots still held: {end['state_slots_free']}/{end['state_slots_total']} free")
    if end["embedding_cache_bytes"] > cache_budget:
        problems.append(f"embedding cache over budget: {end['embedding_cache_bytes']} > {cache_budget}")
    return problems


def print_report(report: dict[str, Any]) -> None:
    ttft, lat = report["ttft_s"], report["latency_s"]
    print(f"soak: {report['requests']} requests in {report['duration_s']}s at concurrency "
          f"{report['concurrency']}, {report['errors']} errors, {report['requests_per_s']} req/s, "
          f"{report['tokens_per_s']} tok/s")
    for name, p in (("TTFT", ttft), ("latency", lat)):
        if p:
            print(f"  {name:8s} p50 {p['p50'] * 1e3:8.1f} ms  p90 {p['p90'] * 1e3:8.1f} ms  "
                  f"p99 {p['p99'] * 1e3:8.1f} ms  max {p['max'] * 1e3:8.1f} ms")
    print("  RSS (MiB) first -> last, growth after warm-up:")
    for label, points in sorted(report["rss_mib"].items()):
        growth = report["rss_growth_mib"].get(label)
        print(f"    {label[:70]:70s} {points[0][1]:7.0f} -> {points[-1][1]:7.0f}"
              + (f"  ({growth:+.0f})" if growth is not None else ""))
    print(f"  end: {json.dumps(report['end'])}")
    for problem in report.get("problems", []):
        print(f"  PROBLEM: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="splitvl soak test: streaming image chats under sustained load")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="Serve YAML of the app")
    parser.add_argument("--address", default=None, help="Ray cluster to deploy on (default: a new local one)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--images", type=int, default=64, help="distinct images cycled through")
    parser.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    parser.add_argument("--warmup-frac", type=float, default=0.25, help="RSS growth is measured after this part")
    parser.add_argument("--max-rss-growth-mib", type=float, default=200.0)
    parser.add_argument("--check", action="store_true", help="exit 1 on errors, growth or leftovers")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    base_url, config = deploy(args.config, args.address)
    try:
        gcs = ray.get_runtime_context().gcs_address
        duration = args.minutes * 60.0
        report = asyncio.run(soak(base_url, config.served_model_id, args.concurrency, duration, args.max_tokens,
                                  args.images, args.sample_s, gcs))
        report["rss_growth_mib"] = rss_growth(report["rss_mib"], args.warmup_frac * duration)
        report["end"] = end_state(APP_NAME)
        report["end"]["embedding_cache_budget"] = config.embedding_cache_bytes
        report["problems"] = check(report, args.max_rss_growth_mib, config.embedding_cache_bytes)
    finally:
        serve.delete(APP_NAME)
        if args.address is None:  # our own local cluster; never stop Serve on someone else's
            serve.shutdown()
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if args.check and report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
