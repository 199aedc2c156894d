"""The load generator spread over client processes: one event loop cannot time 64 streams it is too busy to read.

At concurrency 64 one Python client parses thousands of SSE chunks a second and
uploads a few hundred KB per request; whatever its loop is late by lands in the
TTFT and inter-token gaps it reports as the server's. `run_level_procs` runs
`bench.load.run_level` in `procs` spawned processes, each with its share of the
concurrency and of the requests, all released together once every one has
started, and merges their results. Times are `time.monotonic()`/`perf_counter()`,
CLOCK_MONOTONIC on Linux: one clock for every process of the machine.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import time
from collections.abc import Sequence

from bench.load import Ramp, RequestResult, run_level

STREAMS_PER_PROC = 16  # the default split: one client process per 16 concurrent streams


def default_procs(concurrency: int, cap: int = 8) -> int:
    """Client processes for a level: one per `STREAMS_PER_PROC` streams, at most `cap`."""
    return max(1, min(cap, math.ceil(concurrency / STREAMS_PER_PROC)))


def split_level(bodies: Sequence[dict], concurrency: int, procs: int) -> list[tuple[list[dict], int]]:
    """(bodies, concurrency) of each process: concurrency split as evenly as it goes, requests in proportion."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    out, taken, acc = [], 0, 0
    for share in shares:
        acc += share
        upto = round(len(bodies) * acc / concurrency)
        out.append((list(bodies[taken:upto]), share))
        taken = upto
    return [(b, c) for b, c in out if b]


def stream_ramps(shares: list[int], seconds: float) -> list[Ramp | None]:
    """Each process's `Ramp` (its streams are `shares[i]` consecutive ones of all); None: no ramp."""
    firsts = [sum(shares[:i]) for i in range(len(shares))]
    return [Ramp(seconds, sum(shares), first) if seconds > 0 else None for first in firsts]


def _child(conn, base_url: str, model: str, bodies: list[dict], concurrency: int, api_key: str | None,
           timeout_s: float, ramp: Ramp | None) -> None:
    conn.send("ready")
    conn.recv()  # go
    start = time.monotonic()
    results, _ = asyncio.run(run_level(base_url, model, bodies, concurrency, api_key, timeout_s, ramp))
    conn.send((results, start, time.monotonic()))
    conn.close()


def _recv(pipe, proc) -> object:
    """The child's next message; a child that died instead raises rather than hanging the benchmark."""
    while not pipe.poll(0.5):
        if not proc.is_alive():
            raise RuntimeError(f"a load-generator process exited with code {proc.exitcode}")
    return pipe.recv()


def _run(base_url: str, model: str, bodies: Sequence[dict], concurrency: int, procs: int, api_key: str | None,
         timeout_s: float, ramp_s: float) -> tuple[list[RequestResult], float]:
    ctx = mp.get_context("spawn")  # the parent holds Ray's threads: never fork it
    pipes, children = [], []
    parts = split_level(bodies, concurrency, procs)
    for (part, share), ramp in zip(parts, stream_ramps([share for _, share in parts], ramp_s), strict=True):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child, base_url, model, part, share, api_key, timeout_s, ramp),
                           daemon=True)
        proc.start()
        pipes.append(parent)
        children.append(proc)
    try:
        for pipe, proc in zip(pipes, children):
            _recv(pipe, proc)  # imported and ready
        for pipe in pipes:
            pipe.send("go")
        done = [_recv(pipe, proc) for pipe, proc in zip(pipes, children)]
    finally:
        for proc in children:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    results = [r for res, _, _ in done for r in res]
    return results, max(end for _, _, end in done) - min(start for _, start, _ in done)


async def run_level_procs(
    base_url: str, model: str, bodies: Sequence[dict], concurrency: int, procs: int, api_key: str | None = None,
    timeout_s: float = 600.0, ramp_s: float = 0.0,
) -> tuple[list[RequestResult], float]:
    """`bench.load.run_level` over `procs` client processes (1: in this process), the streams' first
    requests spread over `ramp_s` (`bench.load.Ramp`). Returns (results, wall seconds)."""
    if procs <= 1 or concurrency <= 1:
        ramp = Ramp(ramp_s, concurrency) if ramp_s > 0 else None
        return await run_level(base_url, model, bodies, concurrency, api_key, timeout_s, ramp)
    return await asyncio.to_thread(_run, base_url, model, bodies, concurrency, procs, api_key, timeout_s, ramp_s)
