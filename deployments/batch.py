"""Offline batch inference over JSONL with the same Serve deployments.

    python -m deployments.batch --config configs/demo.yaml --input in.jsonl --output out.jsonl
    ray job submit --working-dir . -- python -m deployments.batch --config ... --input in.jsonl --output /abs/out.jsonl

Lines are OpenAI Batch requests (`/v1/chat/completions`, `/v1/completions`) or
the simple `{"id", "messages", ...}` format (`deployments.batch_format`). The
app is deployed with `serve.run` on the current Ray cluster (local if none)
under its own name, without HTTP; each line goes to the ingress' `respond`
through a handle, so its response body is what the HTTP route would answer.
A broken line gets an error record and the job goes on.

Resumable: lines whose custom_id (simple format: id) is already in the output
are skipped; each result is appended, flushed and fsynced as one line, so a
kill loses at most the lines in flight. On start, a torn last line and
duplicates (from a crash between write and exit) are dropped by rewriting the
file atomically.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.batch_format import BatchLine, jsonl_lines, output_record, parse_line, record_failed, record_key
from deployments.config import args_from_serve_yaml
from deployments.errors import as_api_error

APP_NAME = "splitvl-batch"
INGRESS_DEPLOYMENT = "OpenAIIngress"  # the name app.py gives the ingress


def load_done(output: Path) -> dict[str, bool]:
    """Resume keys already answered -> whether that answer failed.

    Rewrites the file without torn lines or duplicates (from a crash between
    write and exit) when it holds any.
    """
    if not output.exists():
        return {}
    done: dict[str, bool] = {}
    kept: list[str] = []
    lines = jsonl_lines(output.read_bytes())
    for raw in lines:
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
            key = record_key(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # UnicodeDecodeError too
            continue
        if key not in done:
            done[key] = record_failed(record)
            kept.append(line)
    if len(kept) != len(lines):
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name + ".")
        with os.fdopen(fd, "w") as f:
            f.write("".join(k + "\n" for k in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    return done


def read_inputs(path: Path) -> list[BatchLine]:
    """Every non-empty input line, parsed; a resume key twice is an error before anything runs."""
    lines: list[BatchLine] = []
    first_seen: dict[str, int] = {}
    for lineno, text in enumerate(jsonl_lines(path.read_bytes()), start=1):
        if not text.strip():
            continue
        line = parse_line(text, lineno)
        if line.key in first_seen:
            raise SystemExit(f"{path}:{lineno}: duplicate id {line.key!r} (first on line {first_seen[line.key]})")
        first_seen[line.key] = lineno
        lines.append(line)
    return lines


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


async def run_one(ingress: Any, line: BatchLine) -> dict[str, Any]:
    """One line through the ingress (as its HTTP route would answer it); returns the output record."""
    if line.error is not None:
        return output_record(line, None, None)
    try:
        status, body = await ingress.respond.remote(line.chat, line.body)
    except Exception as exc:  # the ingress itself failed (a dead replica): this line's error
        err = as_api_error(exc)
        status, body = err.status, err.body()
    return output_record(line, status, body)


@dataclass(slots=True)
class Progress:
    """Counts of one job (earlier runs included), shown on a tqdm bar."""

    total: int
    ok: int
    failed: int

    def postfix(self) -> dict[str, int]:
        return {"done": self.ok, "failed": self.failed, "remaining": self.total - self.ok - self.failed}

    def summary(self, output: Path) -> str:
        return f"batch: {self.total} lines, {self.ok} done, {self.failed} failed -> {output}"


async def run_all(ingress: Any, todo: list[BatchLine], writer: ResultWriter, concurrency: int,
                  progress: Progress) -> None:
    """Run `todo` with bounded concurrency, writing each record as it finishes."""
    from tqdm import tqdm

    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=progress.total, initial=progress.ok + progress.failed, desc="batch", unit="req",
               file=sys.stderr, mininterval=1.0, postfix=progress.postfix())

    async def worker(line: BatchLine) -> None:
        async with semaphore:
            record = await run_one(ingress, line)
        writer.write(record)
        if record_failed(record):
            progress.failed += 1
        else:
            progress.ok += 1
        bar.set_postfix(progress.postfix(), refresh=False)
        bar.update(1)

    try:
        await asyncio.gather(*(worker(line) for line in todo))
    finally:
        bar.close()


def deploy(config_path: Path) -> Any:
    """Deploy the app from `config_path` on the current Ray cluster; returns its ingress handle."""
    import ray
    import yaml
    from ray import serve

    from deployments.app import build_app

    data = yaml.safe_load(config_path.read_text()) or {}
    args = args_from_serve_yaml(data)
    env_vars = {}
    if "applications" in data:
        env_vars = ((data["applications"][0].get("runtime_env") or {}).get("env_vars")) or {}
    os.environ.update({k: str(v) for k, v in env_vars.items()})
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env_vars} if env_vars else None)
    serve.start(proxy_location="Disabled")
    serve.run(build_app(args), name=APP_NAME, route_prefix=None)
    return serve.get_deployment_handle(INGRESS_DEPLOYMENT, APP_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="splitvl batch inference over JSONL (OpenAI Batch or simple lines)")
    parser.add_argument("--config", required=True, type=Path, help="Serve YAML (as for `serve run`)")
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--keep-app", action="store_true", help="leave the Serve app running afterwards")
    args = parser.parse_args(argv)

    lines = read_inputs(args.input)
    done = load_done(args.output)
    todo = [line for line in lines if line.key not in done]
    earlier = [done[line.key] for line in lines if line.key in done]
    progress = Progress(total=len(lines), ok=earlier.count(False), failed=earlier.count(True))
    print(f"{len(lines)} requests, {len(earlier)} already done, {len(todo)} to run", file=sys.stderr)
    if todo:
        ingress = deploy(args.config)
        writer = ResultWriter(args.output)
        try:
            asyncio.run(run_all(ingress, todo, writer, args.concurrency, progress))
        finally:
            writer.close()
            if not args.keep_app:
                from ray import serve

                serve.delete(APP_NAME)
    print(progress.summary(args.output), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
