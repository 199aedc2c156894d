"""GPU-only: `serve run configs/qwen3-vl-2b.yaml` on two GPUs answers streaming image chat over HTTP.

The shipped YAML is used as is, with `model` pointed at a random-weight checkpoint of the
Qwen3-VL-2B architecture (bench.checkpoints writes one with a tokenizer whose special
tokens carry the real ids) and the HTTP port moved to a free one. The vision encoder and
the LLM replica each ask for a whole GPU, so they must land on different cards; the test
checks that both cards run a process of ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

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


@pytest.mark.timeout(900)
def test_qwen3_vl_2b_yaml_streams_image_chat_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from bench.checkpoints import prepare_checkpoint

    ckpt = prepare_checkpoint("qwen3-vl-2b", os.environ.get("BENCH_CKPT_CACHE"), torch.bfloat16, "cuda")
    port = free_port()
    data = yaml.safe_load((REPO / "configs" / "qwen3-vl-2b.yaml").read_text())
    data["http_options"]["port"] = port
    app = data["applications"][0]
    app["args"]["model"] = str(ckpt)
    config = tmp_path / "qwen3-vl-2b.yaml"
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
        ready_s = time.monotonic() - t0
        # Plain httpx SSE here: the GPU machine has no `openai` package (the CPU tests use it).
        base = f"http://127.0.0.1:{port}/v1"
        model = app["args"]["model_id"]
        assert [m["id"] for m in httpx.get(f"{base}/models", timeout=10).json()["data"]] == [model]
        for size in ((1024, 1024), (640, 480)):
            body = {"model": model, "max_tokens": 32, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes(*size, (200, 40, 90)))}},
                        {"type": "text", "text": "Describe this image."}]}]}
            t1 = time.monotonic()
            first, pieces, usage = None, [], None
            with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=120) as resp:
                assert resp.status_code == 200, resp.read()
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        first = first or time.monotonic()
                        pieces.append(chunk["choices"][0]["delta"]["content"])
                    usage = chunk.get("usage") or usage
            image_tokens = (size[0] // 32) * (size[1] // 32)
            print(f"{size[0]}x{size[1]}: ttft {1e3 * (first - t1):.1f} ms, {len(pieces)} content chunks, "
                  f"usage {usage['prompt_tokens']}+{usage['completion_tokens']} tokens, text {''.join(pieces)[:60]!r}")
            assert usage["completion_tokens"] == 32 and len(pieces) >= 2
            assert usage["prompt_tokens"] > image_tokens  # the image's tokens reached the LLM
        busy = {uuid for uuid, pids in _gpu_pids().items() if pids}
        print(f"ready after {ready_s:.0f} s; GPUs with our processes: {len(busy)}")
        assert len(busy) >= 2, "vision and LLM replicas should sit on different GPUs"
    finally:
        stop_process(proc)
        log.close()
