"""The user-facing commands as subprocesses: `serve run configs/demo.yaml` and the
batch job through `ray job submit` on a `ray start --head` cluster.

Both run with HOME in a temp dir (the demo's tiny checkpoint goes to
~/.cache/splitvl there) and are torn down by the pids this test started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import yaml

from tests.deployments.conftest import wait_until
from tests.deployments.helpers import (
    REPO, data_url, free_port, png_bytes, ray_bin, serve_healthy, stop_process, subprocess_env,
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


def _write_inputs(path: Path, n: int) -> list[str]:
    ids = []
    with path.open("w") as f:
        for i in range(n):
            content: list[dict] = [{"type": "text", "text": f"Describe item {i}."}]
            if i % 2 == 0:
                content.append({"type": "image_url", "image_url": {"url": data_url(png_bytes(32, 32, (i * 25, 9, 9)))}})
            ids.append(f"req-{i}")
            f.write(json.dumps({"id": ids[-1], "messages": [{"role": "user", "content": content}],
                                "max_tokens": 4, "temperature": 0}) + "\n")
        ids.append("bad-1")
        f.write(json.dumps({"id": "bad-1", "messages": [], "max_tokens": 4}) + "\n")
    return ids


def test_batch_job_via_ray_job_submit(tmp_path):
    env = subprocess_env(tmp_path)
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rayjob{os.getpid()}"
    head = subprocess.Popen(
        [ray_bin("ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    try:
        def dashboard_up() -> bool:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                return httpx.get(f"{address}/api/version", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(dashboard_up, timeout_s=120, interval_s=1.0)
        inputs, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        ids = _write_inputs(inputs, 6)
        # A previous run's partial output: one finished line and a torn one.
        output.write_text(json.dumps({"id": "req-1", "text": "earlier", "usage": None}) + "\n{\"id\": \"req-")
        cmd = [ray_bin("ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
               "python", "-m", "deployments.batch", "--config", "configs/demo.yaml",
               "--input", str(inputs), "--output", str(output)]
        for _ in range(30):  # the dashboard answers before its job agent is up; wait for the agent
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
            if "No available agent to submit job" not in done.stderr + done.stdout:
                break
            time.sleep(2)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records = [json.loads(line) for line in output.read_text().splitlines()]
        assert sorted(r["id"] for r in records) == sorted(ids)  # every id exactly once
        by_id = {r["id"]: r for r in records}
        assert by_id["req-1"]["text"] == "earlier"  # resumed, not redone
        assert by_id["bad-1"]["error"]["type"] == "invalid_request_error"
        for rid in ids[:-1]:
            if rid != "req-1":
                assert by_id[rid]["usage"]["completion_tokens"] >= 1 and "text" in by_id[rid]
    finally:
        stop_process(head, sig=signal.SIGTERM)
