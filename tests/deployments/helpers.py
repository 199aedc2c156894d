"""Test helpers: images as bytes/data URLs, a local HTTP server that counts hits, CLI subprocesses."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import PIL.Image
import pytest


def png_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    image = PIL.Image.new("RGB", (width, height), color)
    for x in range(min(width, 16)):  # a little structure so different images differ
        image.putpixel((x, x % height), (x * 13 % 256, 90, 255 - x))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a stub.

    Decoding it fully would fail (or explode); a header-only size check rejects it.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


REPO = Path(__file__).resolve().parents[2]


def subprocess_env(home: Path) -> dict[str, str]:
    """Environment for a CLI subprocess: HOME in a temp dir (the tiny demo checkpoint goes there), no RAY_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), SPLITVL_REFERENCE_OPS="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    return env


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, grace_s: float = 40.0) -> None:
    """Stop a process we started (its own session): signal, wait, then kill its group."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds only what this test started
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def serve_healthy(proc: subprocess.Popen, log_path: Path, port: int) -> Callable[[], bool]:
    """A `wait_until` predicate for a `serve run` subprocess: /health answers 200; fails fast
    (with the log's tail) once the process exits or the log shows a failed deployment."""
    import httpx

    def healthy() -> bool:
        text = log_path.read_text()
        failed = "Exception importing application" in text or re.search(r"Deploying application \S+ failed", text)
        assert proc.poll() is None and not failed, text[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return healthy


def ray_bin(name: str) -> str:
    """A console script of this interpreter's environment (ray, serve), else from PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Route = Callable[[BaseHTTPRequestHandler], None]


class LocalServer:
    """A threaded HTTP server on `host` whose routes are `path -> handler(request)`.

    `hits[path]` counts requests per path (every request counts, even 404s).
    """

    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1"):
        self.routes = routes
        self.hits: Counter[str] = Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits[self.path] += 1
                route = outer.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def send_body(body: bytes, content_type: str = "image/png", status: int = 200) -> Route:
    def route(req: BaseHTTPRequestHandler) -> None:
        req.send_response(status)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    return route


def redirect_to(location: str) -> Route:
    def route(req: BaseHTTPRequestHandler) -> None:
        req.send_response(302)
        req.send_header("Location", location)
        req.send_header("Content-Length", "0")
        req.end_headers()

    return route


def slow_body(delay_s: float) -> Route:
    def route(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "image/png")
        req.end_headers()
        try:
            time.sleep(delay_s)
            req.wfile.write(png_bytes())
        except OSError:
            pass

    return route


def endless_body() -> Route:
    """Streams without Content-Length until the client hangs up."""

    def route(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "image/png")
        req.end_headers()
        try:
            for _ in range(10_000):
                req.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    return route


def hub_cache_from(checkpoint: Path, hub_cache: Path, repo_id: str, revision: str = "0" * 39 + "1") -> Path:
    """Lay `checkpoint` out in `hub_cache` as huggingface_hub writes a download of `repo_id`:
    `models--org--name/{blobs/<hash>, snapshots/<revision>/<file> -> ../../blobs/<hash>, refs/main}`.
    Returns the snapshot directory."""
    import hashlib

    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def run_tiny_app(serve_instance: str, ckpt: Path, name: str, llm: dict[str, Any], **config: Any) -> str:
    """Run Serve app `name` at `/name`: the real engine on a tiny checkpoint, CPU fp32, small replicas.

    `llm` adds to the LLM replicas' config and `config` to the app's (`model_id` defaults
    to `name`). Returns the app's base URL.
    """
    from ray import serve

    from deployments.app import build_app

    app = {"model": str(ckpt), "model_id": name, "device": "cpu", "dtype": "float32",
           "llm": {"num_cpus": 0.1, **llm}, "vision": {"num_cpus": 0.1}, **config}
    serve.run(build_app(app), name=name, route_prefix=f"/{name}")
    return f"{serve_instance}/{name}"


def tiny_checkpoint_fixture(arch: str):
    """A module-scoped fixture giving the path of the tiny `arch` checkpoint."""

    @pytest.fixture(scope="module")
    def ckpt(tiny_checkpoint):
        return tiny_checkpoint(arch)

    return ckpt


def transformers_image_chat(
    ckpt: Path, content: list[dict[str, Any]], image: bytes, max_new_tokens: int, ignore_eos: bool = False,
) -> tuple[int, list[int], str]:
    """(prompt tokens, greedy new tokens, their text) of transformers' `generate` on `ckpt` with our
    image preprocessing; `content`: the user message's chat-template parts (`{"type": "image"}`, text)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from models.processor import ImageProcessor, load_image

    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    processor = ImageProcessor.from_pretrained(ckpt)
    pad = model.config.image_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    processed = processor.preprocess([load_image(image)])
    count = processor.num_image_tokens(processed.grid_thw[0])
    ids = [x for t in tokenizer.encode(text, add_special_tokens=False) for x in ([t] * count if t == pad else [t])]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=processed.pixel_values,
            image_grid_thw=processed.grid_thw, mm_token_type_ids=(input_ids == pad).int(),
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else 0, do_sample=False,
        )
    new = out[0, len(ids):].tolist()
    return len(ids), new, tokenizer.decode(new, skip_special_tokens=True)


def stream_in_background(url: str, body: dict[str, Any], timeout_s: float,
                         started_after: int = 3) -> tuple[threading.Thread, threading.Event, list[str]]:
    """POST a streamed chat to `url` (/v1/chat/completions) from a daemon thread: (thread, started,
    lines); `lines` fills with its non-empty SSE lines, `started` is set once `started_after` came
    or the stream ended."""
    import httpx

    started, lines = threading.Event(), []

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout_s) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) >= started_after:
                    started.set()
        started.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    return reader, started, lines
