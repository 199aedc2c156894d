"""Load generator for the OpenAI chat endpoint: image-chat workload, streaming client, stats.

Each request is one user message with one image (a data URL) and a short
question, `max_tokens` = the output length and `ignore_eos: true` (a top-level
field of our API, vLLM's extension; the `openai` client sends it through
`extra_body`), streamed with `stream_options.include_usage`. Every request gets
its own image (unless `distinct_images=False`), so the embedding cache never
hits and each request runs the vision encoder.

Per request the client records the time to the first content chunk (TTFT), the
gaps between content chunks, the end time and the usage's completion tokens.
TPOT = (last chunk - first chunk) / (completion tokens - 1).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from deployments.metrics import prometheus_samples

QUESTION = "Describe this image in one sentence."


def make_image_url(size: int, seed: int) -> str:
    """A JPEG data URL of a smooth random `size`x`size` image (unique per seed, about 100 KB)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    image = small.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(model: str, image_url: str | None, output_len: int, question: str = QUESTION) -> dict:
    """One streaming chat request with a fixed output length."""
    content: list[dict] = [{"type": "text", "text": question}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass(slots=True)
class RequestResult:
    ok: bool
    start: float
    end: float = math.nan
    ttft_s: float = math.nan
    chunk_gaps_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float:
        if self.completion_tokens < 2 or math.isnan(self.ttft_s):
            return math.nan
        return (self.end - self.start - self.ttft_s) / (self.completion_tokens - 1)


@dataclass(frozen=True, slots=True)
class Ramp:
    """Staggered first requests: stream `first + k` of `total` starts `(first + k) * seconds / total` in.

    With one fixed output length, streams that start together finish together: the load
    arrives in waves, each leaving the engine empty while the next one's images are
    decoded and encoded. Spreading the first requests over about one request's duration
    keeps the streams staggered (each stream's cycle is the same length), as a server's
    steady traffic is; the wall time still counts the ramp.
    """

    seconds: float
    total: int
    first: int = 0

    def delay_s(self, k: int) -> float:
        return (self.first + k) * self.seconds / self.total


async def stream_chat(client, url: str, body: dict, headers: dict[str, str], payload: bytes | None = None) -> RequestResult:
    """POST one streaming chat request and time its SSE chunks.

    `payload`: `body` already serialized (JSON); serializing a multi-hundred-KB image body
    inside the timed window would charge the client's own CPU to the server's TTFT.
    """
    payload = json.dumps(body).encode() if payload is None else payload
    headers = {**headers, "Content-Type": "application/json"}
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start)
    last = None
    try:
        async with client.stream("POST", url, content=payload, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = str(event["error"].get("message", event["error"]))[:200]
                    return res
                if event.get("usage"):
                    res.completion_tokens = int(event["usage"]["completion_tokens"])
                choices = event.get("choices") or []
                # The first chunk carries only the role; a token chunk has text or the finish reason.
                if any(c.get("delta", {}).get("content") or c.get("finish_reason") for c in choices):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.chunk_gaps_s.append(now - last)
                    last = now
        res.end = last if last is not None else time.perf_counter()
        res.ok = res.completion_tokens == body["max_tokens"]
        if not res.ok:
            res.error = f"{res.completion_tokens} completion tokens, asked for {body['max_tokens']}"
    except Exception as exc:  # a failed request is a counted error, never a crashed benchmark
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    return res


async def run_level(
    base_url: str, model: str, bodies: Sequence[dict], concurrency: int, api_key: str | None = None,
    timeout_s: float = 600.0, ramp: Ramp | None = None,
) -> tuple[list[RequestResult], float]:
    """Send `bodies` with at most `concurrency` in flight. Returns (results, wall seconds).

    `ramp`: when each stream sends its first request (default: all at once).
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    queue: asyncio.Queue[tuple[dict, bytes]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait((body, json.dumps(body).encode()))
    results: list[RequestResult] = []

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def worker(k: int) -> None:
            if ramp is not None:
                await asyncio.sleep(ramp.delay_s(k))
            while not queue.empty():
                body, payload = queue.get_nowait()
                results.append(await stream_chat(client, url, body, headers, payload))

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def percentile(values: Sequence[float], q: float) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.percentile(vals, q)) if vals else math.nan


def summarize(results: Sequence[RequestResult], wall_s: float, concurrency: int) -> dict:
    """Throughput and latency percentiles of one concurrency level (latencies in ms)."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    gaps = [g for r in ok for g in r.chunk_gaps_s]
    ms = 1e3
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), None),
        "wall_s": wall_s,
        "output_tok_s": tokens / wall_s if wall_s > 0 else math.nan,
        "requests_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "ttft_p50_ms": percentile([r.ttft_s * ms for r in ok], 50),
        "ttft_p99_ms": percentile([r.ttft_s * ms for r in ok], 99),
        "ttft_mean_ms": statistics.fmean([r.ttft_s * ms for r in ok]) if ok else math.nan,
        "tpot_p50_ms": percentile([r.tpot_s * ms for r in ok], 50),
        "tpot_p99_ms": percentile([r.tpot_s * ms for r in ok], 99),
        "itl_p50_ms": percentile([g * ms for g in gaps], 50),
        "itl_p99_ms": percentile([g * ms for g in gaps], 99),
    }


# ------------------------------------------------------------------ /metrics histograms


@dataclass(slots=True)
class HistogramSample:
    """One histogram summed over replicas: cumulative bucket counts, sum, count."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0

    def minus(self, before: HistogramSample | None) -> HistogramSample:
        if before is None:
            return self
        return HistogramSample({le: c - before.buckets.get(le, 0.0) for le, c in self.buckets.items()},
                               self.total - before.total, self.count - before.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else math.nan

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket holding quantile `q` (Prometheus' histogram_quantile)."""
        if self.count <= 0:
            return math.nan
        rank, prev_le, prev_c = q * self.count, 0.0, 0.0
        for le in sorted(self.buckets):
            c = self.buckets[le]
            if c >= rank:
                if math.isinf(le):
                    return prev_le
                width = c - prev_c
                return prev_le + (le - prev_le) * ((rank - prev_c) / width if width > 0 else 1.0)
            prev_le, prev_c = le, c
        return math.nan


def parse_histograms(text: str) -> dict[str, HistogramSample]:
    """Every histogram in a Prometheus text page, summed over label sets except `le`."""
    out: dict[str, HistogramSample] = {}
    for name, labels, value in prometheus_samples(text):
        if name.endswith("_bucket"):
            le_text = labels.split('le="', 1)[1].split('"', 1)[0] if 'le="' in labels else None
            if le_text is None:
                continue
            le = math.inf if le_text == "+Inf" else float(le_text)
            hist = out.setdefault(name[: -len("_bucket")], HistogramSample())
            hist.buckets[le] = hist.buckets.get(le, 0.0) + value
        elif name.endswith("_sum"):
            out.setdefault(name[: -len("_sum")], HistogramSample()).total += value
        elif name.endswith("_count"):
            out.setdefault(name[: -len("_count")], HistogramSample()).count += value
    return out


async def scrape(base_url: str, api_key: str | None = None) -> dict[str, HistogramSample]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await client.get(base_url.rstrip("/") + "/metrics", headers=headers)
        resp.raise_for_status()
        return parse_histograms(resp.text)
