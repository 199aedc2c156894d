"""The user-facing commands as subprocesses: `serve run configs/demo.yaml`, and `serve run`
with `model:` a Hugging Face repo id served offline from a hub-layout cache (the batch job
through `ray job submit` is `test_batch_jobs.py`).

They run with HOME in a temp dir (the demo's tiny checkpoint goes to
~/.cache/splitvl there) and are torn down by the pids this test started.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import openai
import yaml

from tests.deployments.conftest import wait_until
from tests.deployments.helpers import (
    REPO, data_url, free_port, hub_cache_from, png_bytes, ray_bin, serve_healthy, stop_process, subprocess_env,
)


def _demo_config(tmp_path: Path, port: int, ray_port: int | None = None) -> Path:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["http_options"]["port"] = port
    out = tmp_path / "demo.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def test_serve_run_demo_answers(tmp_path):
    port = free_port()
    config = _demo_config(tmp_path, port)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([ray_bin("serve"), "run", str(config)], cwd=REPO, env=subprocess_env(tmp_path),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(serve_healthy(proc, tmp_path / "serve.log", port), timeout_s=180, interval_s=1.0)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.create(
            model="demo", max_tokens=8,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                   {"type": "image_url",
                                                    "image_url": {"url": data_url(png_bytes())}}]}],
        )
        assert resp.choices[0].finish_reason in ("length", "stop")
        assert resp.usage.completion_tokens >= 1
        assert (tmp_path / ".cache" / "splitvl" / "tiny-qwen3_vl" / "config.json").is_file()
    finally:
        stop_process(proc)
        log.close()


def test_serve_run_with_a_hub_repo_id_offline(tmp_path, tiny_checkpoint):
    """`model: org/name` serves from a hub-layout cache (HF_HOME) with HF_HUB_OFFLINE=1."""
    hub_cache_from(tiny_checkpoint("qwen3_vl"), tmp_path / "hf" / "hub", "splitvl-test/tiny-vl")
    port = free_port()
    config = _demo_config(tmp_path, port)
    data = yaml.safe_load(config.read_text())
    args = data["applications"][0]["args"]
    for key in ("create_tiny_if_missing", "model_id"):
        args.pop(key)
    args["model"] = "splitvl-test/tiny-vl"
    config.write_text(yaml.safe_dump(data))
    env = {**subprocess_env(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([ray_bin("serve"), "run", str(config)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(serve_healthy(proc, tmp_path / "serve.log", port), timeout_s=180, interval_s=1.0)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["splitvl-test/tiny-vl"]
        resp = client.chat.completions.create(
            model="splitvl-test/tiny-vl", max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                   {"type": "image_url",
                                                    "image_url": {"url": data_url(png_bytes())}}]}],
        )
        assert resp.usage.completion_tokens >= 1
        assert not (tmp_path / ".cache" / "splitvl").exists()  # no demo checkpoint: the hub snapshot served
    finally:
        stop_process(proc)
        log.close()
