"""Offline batch inference over JSONL with the same Serve deployments.

    python -m deployments.batch --config configs/demo.yaml --input in.jsonl --output out.jsonl
    ray job submit --working-dir . -- python -m deployments.batch --config ... --input /abs/in.jsonl --output /abs/out.jsonl

An input line is `{"id", "messages", ...sampling params}` (a chat completion
request body); an output line is `{"id", "text", "finish_reason", "usage"}` or
`{"id", "error": {...}}`. The app (vision + LLM replicas) is deployed with
`serve.run` on the current Ray cluster (local if none) under its own name, and
requests go to its ingress' `chat` through a deployment handle (no HTTP).

Resumable: ids already in the output are skipped; each result is appended,
flushed and fsynced as one line, so a kill loses at most the lines in flight.
On start, a torn last line and duplicate ids (from a crash between write and
exit) are dropped by rewriting the file atomically.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deployments.config import AppConfig, args_from_serve_yaml
from deployments.errors import InvalidRequestError, as_api_error, pydantic_error_to_api
from deployments.messages import ChoiceDelta, Usage
from deployments.protocol import ChatCompletionRequest, usage_dict

APP_NAME = "splitvl-batch"


def load_done(output: Path) -> set[str]:
    """Ids already answered; rewrites the file without torn lines or duplicates."""
    if not output.exists():
        return set()
    done: set[str] = set()
    kept: list[str] = []
    dirty = False
    for line in output.read_text().splitlines():
        try:
            record = json.loads(line)
            rid = str(record["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            dirty = True
            continue
        if rid in done:
            dirty = True
            continue
        done.add(rid)
        kept.append(line)
    if dirty:
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name + ".")
        with os.fdopen(fd, "w") as f:
            f.write("".join(k + "\n" for k in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    return done


def read_inputs(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(id, request body) per non-empty input line; ids must be unique."""
    items, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            rid = str(body.pop("id"))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise SystemExit(f"{path}:{lineno}: not a JSON object with an 'id' ({exc})") from None
        if rid in seen:
            raise SystemExit(f"{path}:{lineno}: duplicate id {rid!r}")
        seen.add(rid)
        items.append((rid, body))
    return items


class ResultWriter:
    """Appends one JSON line per result, durably (flush + fsync)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


async def run_one(router: Any, rid: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One request through the ingress' router (`router`: the ingress handle); returns the output record."""
    try:
        request = ChatCompletionRequest.model_validate({**body, "stream": False})
    except ValidationError as exc:
        return {"id": rid, "error": pydantic_error_to_api(exc).body()["error"]}
    if request.n != 1:
        return {"id": rid, "error": InvalidRequestError("batch requests take n = 1", "n").body()["error"]}
    text, finish, usage = "", None, None
    stream = router.chat.options(stream=True).remote(request)
    try:
        async with asyncio.timeout(timeout_s):
            async for event in stream:
                if isinstance(event, ChoiceDelta):
                    text += event.text
                    finish = event.finish_reason or finish
                elif isinstance(event, Usage):
                    usage = usage_dict(event)
    except Exception as exc:  # each line gets its own error; the job goes on
        stream.cancel()
        return {"id": rid, "error": as_api_error(exc).body()["error"]}
    return {"id": rid, "text": text, "finish_reason": finish, "usage": usage}


async def run_all(router: Any, todo: list[tuple[str, dict[str, Any]]], writer: ResultWriter,
                  concurrency: int, timeout_s: float) -> int:
    """Run `todo` with bounded concurrency; returns the number of error lines."""
    from tqdm import tqdm

    semaphore = asyncio.Semaphore(concurrency)
    errors = 0
    bar = tqdm(total=len(todo), desc="batch", unit="req", file=sys.stderr)

    async def worker(rid: str, body: dict[str, Any]) -> None:
        nonlocal errors
        async with semaphore:
            record = await run_one(router, rid, body, timeout_s)
        errors += "error" in record
        writer.write(record)
        bar.update(1)

    try:
        await asyncio.gather(*(worker(rid, body) for rid, body in todo))
    finally:
        bar.close()
    return errors


def deploy(config_path: Path) -> tuple[Any, AppConfig]:
    """Deploy the app from `config_path` on the current Ray cluster; returns its ingress' handle."""
    import ray
    import yaml
    from ray import serve

    from deployments.app import build_app

    data = yaml.safe_load(config_path.read_text()) or {}
    args = args_from_serve_yaml(data)
    config = AppConfig.model_validate(args)
    env_vars = {}
    if "applications" in data:
        env_vars = ((data["applications"][0].get("runtime_env") or {}).get("env_vars")) or {}
    os.environ.update({k: str(v) for k, v in env_vars.items()})
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env_vars} if env_vars else None)
    serve.start(proxy_location="Disabled")
    serve.run(build_app(args), name=APP_NAME, route_prefix=None)
    return serve.get_deployment_handle("OpenAIIngress", APP_NAME), config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="splitvl batch inference over JSONL")
    parser.add_argument("--config", required=True, type=Path, help="Serve YAML (as for `serve run`)")
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--keep-app", action="store_true", help="leave the Serve app running afterwards")
    args = parser.parse_args(argv)

    items = read_inputs(args.input)
    done = load_done(args.output)
    todo = [(rid, body) for rid, body in items if rid not in done]
    print(f"{len(items)} requests, {len(items) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    if not todo:
        return 0
    router, config = deploy(args.config)
    writer = ResultWriter(args.output)
    try:
        errors = asyncio.run(run_all(router, todo, writer, args.concurrency, config.limits.request_timeout_s))
    finally:
        writer.close()
        if not args.keep_app:
            from ray import serve

            serve.delete(APP_NAME)
    print(f"done: {len(todo) - errors} ok, {errors} errors -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
