"""GPU-only: shipped Serve YAMLs, run with `serve run`, answer streaming image chat over HTTP.

Each YAML is used as is, with `model` pointed at a random-weight checkpoint of its
architecture (bench.checkpoints writes one with a tokenizer whose special tokens carry
the real ids) and the HTTP port moved to a free one.
- `configs/qwen3-vl-2b.yaml`: the vision encoder and the LLM replica each ask for a whole
  GPU, so they must land on different cards; both cards run a process of ours.
- `configs/qwen3-vl-8b-tp2.yaml`: TP=2 ranks on 0.6 of each of two GPUs, vision replicas on 0.2
  beside them (both cards hold a rank); a TP worker killed under load: the streams end, the LLM
  replica is replaced and new requests succeed.
- `configs/qwen3.5-0.8b.yaml`: one GPU shared, the engine owned by the ingress replica
  (`llm.colocate_ingress`): no LLMServer deployment; the engine's metrics come from the ingress.
  It runs in a process of its own (`llm.engine_process`) and opens the vision replica's CUDA
  IPC handles there: its greedy image chats equal those of the engine in the replica
  (`engine_process: false`), and so do those of the tower in that replica (`vision.colocate_llm`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.deployments.conftest import wait_until
from tests.deployments.helpers import REPO, data_url, free_port, png_bytes, ray_bin, serve_healthy, stop_process

pytestmark = pytest.mark.gpu


def _gpu_pids() -> dict[str, set[int]]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    by_gpu: dict[str, set[int]] = {}
    for line in out.splitlines():
        uuid, pid = (x.strip() for x in line.split(","))
        by_gpu.setdefault(uuid, set()).add(int(pid))
    return by_gpu


@contextmanager
def _serve_yaml(tmp_path: Path, name: str, arch: str, llm: dict | None = None,
                dummy: bool = False, vision: dict | None = None) -> Iterator[tuple[str, str, float]]:
    """`serve run configs/<name>.yaml` on a random-weight `arch` checkpoint, `llm` and `vision` added to
    those sections: (base URL, model id, ready s). `dummy`: no safetensors written; both deployments make
    random weights in place (`load_format: dummy`)."""
    from bench.checkpoints import prepare_checkpoint

    ckpt = prepare_checkpoint(arch, os.environ.get("BENCH_CKPT_CACHE"), torch.bfloat16, "cuda", weights=not dummy)
    port = free_port()
    data = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    data["http_options"]["port"] = port
    app = data["applications"][0]
    app["args"]["model"] = str(ckpt)
    app["args"]["llm"] = {**app["args"].get("llm", {}), **(llm or {})}
    app["args"]["vision"] = {**app["args"].get("vision", {}), **(vision or {})}
    if dummy:
        app["args"]["llm"]["load_format"] = "dummy"
        app["args"]["vision"] = {**app["args"].get("vision", {}), "load_format": "dummy"}
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen([ray_bin("serve"), "run", str(config)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(serve_healthy(proc, log_path, port), timeout_s=600, interval_s=2.0)
        yield f"http://127.0.0.1:{port}", app["args"]["model_id"], time.monotonic() - t0
    finally:
        stop_process(proc)
        log.close()


def _stream_image_chat(base: str, model: str, size: tuple[int, int], max_tokens: int = 32
                       ) -> tuple[float, list[str], dict]:
    """One streamed greedy image chat: (TTFT s, content chunks, usage). Plain httpx SSE: the GPU
    machine has no `openai` package (the CPU tests use it)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(*size, (200, 40, 90)))}},
                {"type": "text", "text": "Describe this image."}]}]}
    t1 = time.monotonic()
    first, pieces, usage = None, [], None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.monotonic()
                pieces.append(chunk["choices"][0]["delta"]["content"])
            usage = chunk.get("usage") or usage
    return first - t1, pieces, usage


def _check_image_chats(base: str, model: str) -> None:
    assert [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]] == [model]
    for size in ((1024, 1024), (640, 480)):
        ttft, pieces, usage = _stream_image_chat(base, model, size)
        image_tokens = (size[0] // 32) * (size[1] // 32)
        print(f"{size[0]}x{size[1]}: ttft {1e3 * ttft:.1f} ms, {len(pieces)} content chunks, "
              f"usage {usage['prompt_tokens']}+{usage['completion_tokens']} tokens, text {''.join(pieces)[:60]!r}")
        assert usage["completion_tokens"] == 32 and len(pieces) >= 2
        assert usage["prompt_tokens"] > image_tokens  # the image's tokens reached the LLM


@pytest.mark.timeout(900)
def test_qwen3_vl_2b_yaml_streams_image_chat_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    with _serve_yaml(tmp_path, "qwen3-vl-2b", "qwen3-vl-2b") as (base, model, ready_s):
        _check_image_chats(base, model)
        busy = {uuid for uuid, pids in _gpu_pids().items() if pids}
        print(f"ready after {ready_s:.0f} s; GPUs with our processes: {len(busy)}")
        assert len(busy) >= 2, "vision and LLM replicas should sit on different GPUs"


@pytest.mark.timeout(900)
def test_qwen3_5_0_8b_yaml_colocated_streams_image_chat_on_one_gpu(tmp_path):
    """The shipped colocated YAML: image chats, then 16 concurrent streams, all complete; the engine's
    metrics are the ingress replica's (no LLMServer deployment exists)."""
    from deployments.metrics import parse_prometheus

    with _serve_yaml(tmp_path, "qwen3.5-0.8b", "qwen3.5-0.8b") as (base, model, ready_s):
        _check_image_chats(base, model)
        sizes = [(448 + 32 * (i % 8), 448) for i in range(16)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(sizes)) as pool:
            runs = list(pool.map(lambda size: _stream_image_chat(base, model, size, 128), sizes))
        wall = time.monotonic() - t0
        assert all(usage["completion_tokens"] == 128 and len(pieces) >= 2 for _, pieces, usage in runs)
        chunks = sum(len(pieces) for _, pieces, _ in runs)
        print(f"ready after {ready_s:.0f} s; 16 streams x 128 tokens in {wall:.2f} s "
              f"({16 * 128 / wall:.0f} tok/s), {16 * 128 / chunks:.2f} tokens per content chunk")
        name = "splitvl_engine_time_to_first_token_seconds_count"

        def metrics() -> str | None:  # replicas push their metrics every few seconds
            text = httpx.get(f"{base}/metrics", timeout=10).text
            return text if parse_prometheus(text).get(name, 0.0) >= 2 + len(sizes) else None

        text = wait_until(metrics, timeout_s=30)
        engine = [line for line in text.splitlines() if line.startswith(name)]
        assert engine and all('deployment="OpenAIIngress"' in line for line in engine), engine
        assert 'deployment="LLMServer"' not in text


@pytest.mark.timeout(1200)
def test_qwen3_5_0_8b_yaml_engine_process_equals_in_process(tmp_path):
    """configs/qwen3.5-0.8b.yaml with and without `llm.engine_process`: the same greedy image chats
    (the embeddings reach the engine process as CUDA IPC handles it opens itself)."""
    answers = {}
    for name, llm in (("in-process", {"engine_process": False}), ("engine-process", {})):
        (tmp_path / name).mkdir()
        with _serve_yaml(tmp_path / name, "qwen3.5-0.8b", "qwen3.5-0.8b", llm) as (base, model, ready_s):
            runs = [_stream_image_chat(base, model, size) for size in ((1024, 1024), (640, 480))]
            answers[name] = [("".join(pieces), usage["prompt_tokens"], usage["completion_tokens"])
                             for _, pieces, usage in runs]
            print(f"{name}: ready after {ready_s:.0f} s, TTFT {[round(1e3 * t, 1) for t, _, _ in runs]} ms")
    assert answers["engine-process"] == answers["in-process"]
    assert all(completion == 32 for _, _, completion in answers["in-process"])


def _vision_layout_answers(tmp_path: Path, engine_process: bool, under_load) -> dict[str, list]:
    """configs/qwen3.5-0.8b.yaml with the VisionEncoder deployment ("deployment") and with
    `vision.colocate_llm` ("colocated"): each one's greedy answers to two image chats, one at a time;
    `under_load(base, model, answers)` then runs on the colocated app."""
    answers = {}
    for name, vision in (("deployment", {}), ("colocated", {"colocate_llm": True})):
        (tmp_path / name).mkdir()
        with _serve_yaml(tmp_path / name, "qwen3.5-0.8b", "qwen3.5-0.8b", {"engine_process": engine_process},
                         vision=vision) as (base, model, ready_s):
            runs = [_stream_image_chat(base, model, size) for size in ((1024, 1024), (640, 480))]
            answers[name] = [("".join(pieces), usage["prompt_tokens"], usage["completion_tokens"])
                             for _, pieces, usage in runs]
            print(f"{name}: ready after {ready_s:.0f} s, TTFT {[round(1e3 * t, 1) for t, _, _ in runs]} ms")
            if name == "colocated":
                under_load(base, model, answers[name])
    assert all(completion == 32 for _, _, completion in answers["deployment"])
    return answers


def _sixteen_concurrent_image_chats(base: str, model: str) -> int:
    """16 concurrent image chats of distinct sizes (tower calls beside decode steps) all complete; their count."""
    sizes = [(448 + 32 * (i % 8), 448 + 64 * (i // 8)) for i in range(16)]
    with ThreadPoolExecutor(len(sizes)) as pool:
        loaded = list(pool.map(lambda size: _stream_image_chat(base, model, size, 64), sizes))
    assert all(usage["completion_tokens"] == 64 for _, _, usage in loaded)
    return len(sizes)


@pytest.mark.timeout(1200)
def test_qwen3_5_0_8b_yaml_vision_in_the_llm_replica_equals_its_own_deployment(tmp_path):
    """configs/qwen3.5-0.8b.yaml (engine in the replica) with `vision.colocate_llm`: the tower in the
    ingress replica on its own stream, the engine's steps on a high-priority one. One chat at a time,
    the same greedy answers as with the VisionEncoder deployment; then 16 concurrent image chats (tower
    calls beside decode steps) all complete."""
    answers = _vision_layout_answers(tmp_path, False,
                                     lambda base, model, _: _sixteen_concurrent_image_chats(base, model))
    assert answers["colocated"] == answers["deployment"]


@pytest.mark.timeout(1200)
def test_qwen3_5_0_8b_yaml_vision_in_the_engine_process_equals_its_own_deployment(tmp_path):
    """configs/qwen3.5-0.8b.yaml (engine process) with `vision.colocate_llm`: the tower in the engine
    process on its own stream, the engine's steps on a high-priority one, the router sending resized
    pixels. One chat at a time, the same greedy answers as with the VisionEncoder deployment; then 16
    concurrent image chats (tower calls beside decode steps) all complete, the same image again is
    not encoded again, and the engine process' tower calls reach the ingress' vision metrics."""
    from deployments.metrics import parse_prometheus

    def under_load(base: str, model: str, answered: list) -> None:
        loaded = _sixteen_concurrent_image_chats(base, model)
        _, pieces, usage = _stream_image_chat(base, model, (640, 480))  # the router's cache: not encoded again
        assert ("".join(pieces), usage["prompt_tokens"], usage["completion_tokens"]) == answered[1]
        images, batches = "splitvl_vision_images_total", "splitvl_vision_batches_total"

        def metrics() -> dict | None:  # replicas push their metrics every few seconds
            got = parse_prometheus(httpx.get(f"{base}/metrics", timeout=10).text)
            return got if got.get(images, 0.0) >= 2 + loaded else None

        got = wait_until(metrics, timeout_s=30)
        print(f"tower calls: {got[batches]:.0f} for {got[images]:.0f} images")
        assert got[images] == 2 + loaded and 2 < got[batches] <= got[images]  # every image once, batched

    answers = _vision_layout_answers(tmp_path, True, under_load)
    assert answers["colocated"] == answers["deployment"]


def _tp_worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::TPWorker"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.mark.timeout(1500)
def test_qwen3_vl_8b_tp2_yaml_on_two_gpus_survives_a_killed_tp_worker(tmp_path):
    """The shipped TP2 YAML on two GPUs: image chats stream, each card holds a TP rank and the vision
    replicas fit beside them; one TP worker killed under 16 concurrent streams: every stream ends (an
    error or a full answer, no hang), Serve replaces the LLM replica, and new image chats succeed."""
    import signal

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    with _serve_yaml(tmp_path, "qwen3-vl-8b-tp2", "qwen3-vl-8b", dummy=True) as (base, model, ready_s):
        _check_image_chats(base, model)
        busy = {uuid for uuid, pids in _gpu_pids().items() if pids}
        workers = _tp_worker_pids()
        print(f"ready after {ready_s:.0f} s; GPUs with our processes: {len(busy)}; TP worker pids {workers}")
        assert len(busy) == 2 and len(workers) == 2

        def stream(size):  # 2,048 tokens: still decoding when the worker dies
            try:
                _, pieces, usage = _stream_image_chat(base, model, size, 2048)
                return "complete" if usage and usage["completion_tokens"] == 2048 else "cut short"
            except (AssertionError, httpx.HTTPError, json.JSONDecodeError, TypeError) as exc:
                return type(exc).__name__

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(stream, (448 + 32 * (i % 8), 448)) for i in range(16)]
            time.sleep(3.0)  # the streams are decoding
            os.kill(workers[-1], signal.SIGKILL)
            outcomes = [f.result(timeout=300) for f in futures]
        print(f"outcomes after the kill: {outcomes}")
        assert any(o != "complete" for o in outcomes)  # every stream ended (no hang); the kill cut some

        def recovered() -> bool:
            try:
                _, pieces, usage = _stream_image_chat(base, model, (640, 480))
            except (AssertionError, httpx.HTTPError, json.JSONDecodeError, TypeError):
                return False
            return usage["completion_tokens"] == 32 and len(pieces) >= 2

        t0 = time.monotonic()
        wait_until(recovered, timeout_s=600, interval_s=5.0)
        fresh = _tp_worker_pids()
        print(f"new image chats after {time.monotonic() - t0:.0f} s; TP worker pids {fresh}")
        assert len(fresh) == 2 and not set(fresh) & set(workers)
