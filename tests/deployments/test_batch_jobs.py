"""Batch jobs as the README runs them, under Ray token authentication.

The commands are read out of README's "With `ray job submit` on a local head"
block and run as written, in a HOME that already holds `~/.ray/auth_token`
(where Ray 2.60 turns token auth on by itself). Only what cannot be shared on a
CI box changes: the two ports (6379, 8265) become free ones, the output file
moves into the test's temp dir, and `ray start` gets `--block` and its own
`--temp-dir` so the test can stop exactly the head it started.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deployments.batch_format import record_key
from tests.deployments.conftest import wait_until
from tests.deployments.helpers import REPO, data_url, free_port, png_bytes, stop_process, subprocess_env

README_OUTPUT = "/tmp/splitvl-batch.jsonl"


def readme_commands() -> list[str]:
    """The shell commands of README's local-head batch block (continuation lines joined)."""
    section = (REPO / "README.md").read_text().split("### With `ray job submit` on a local head", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


class Head:
    """The README's head node and the environment its commands run in."""

    def __init__(self, env: dict[str, str], ports: dict[str, str], submit: str, token: str):
        self.env, self.ports, self.submit_cmd, self.token = env, ports, submit, token

    def localize(self, cmd: str) -> list[str]:
        for old, new in self.ports.items():
            cmd = cmd.replace(old, new)
        return shlex.split(cmd)

    def run(self, args: list[str], timeout_s: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s)

    def submit(self, output: Path, extra: list[str] = (), job_args: list[str] = (),
               input_path: str | None = None) -> subprocess.CompletedProcess:
        """README's `ray job submit`, writing to `output` (options `extra`, batch arguments `job_args`)."""
        args = self.localize(self.submit_cmd.replace(README_OUTPUT, str(output)))
        if input_path is not None:
            args[args.index("--input") + 1] = input_path
        at = args.index("submit") + 1
        args = args[:at] + list(extra) + args[at:] + list(job_args)
        # The dashboard answers before its job agent is up (minutes on a loaded 2-core box); wait for the agent.
        deadline = time.monotonic() + 300
        while True:
            done = self.run(args)
            if "No available agent to submit job" not in done.stderr + done.stdout or time.monotonic() > deadline:
                return done
            time.sleep(3)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    token = secrets.token_hex(32)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    env = subprocess_env(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ports = {"6379": str(free_port()), "8265": str(free_port())}
    commands = readme_commands()
    assert [c.split()[:2] for c in commands] == [["export", "RAY_AUTH_MODE=token"], ["ray", "get-auth-token"],
                                                 ["ray", "start"], ["ray", "job"]], commands
    log = home / "head.log"
    proc = None
    try:
        head = Head(env, ports, commands[3], token)
        for cmd in commands[:3]:
            if cmd.startswith("export "):
                key, _, value = cmd.split(" ", 1)[1].partition("=")
                env[key] = value
            elif cmd.startswith("ray start"):
                args = head.localize(cmd) + ["--block", f"--temp-dir=/tmp/raybj{os.getpid()}"]
                proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
            else:
                done = head.run(head.localize(cmd))
                assert done.returncode == 0 and done.stdout.strip() == token, done.stderr  # HOME's token

        def dashboard_up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                # Any answer will do: under token auth it is a 401 without the token.
                return httpx.get(f"http://127.0.0.1:{ports['8265']}/api/version", timeout=2).status_code > 0
            except httpx.HTTPError:
                return False

        wait_until(dashboard_up, timeout_s=120, interval_s=1.0)
        yield head
    finally:
        if proc is not None:
            stop_process(proc, sig=signal.SIGTERM)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_readme_batch_commands_under_token_auth(head, tmp_path):
    # Token auth is really on: a client without the token is refused.
    address = f"http://127.0.0.1:{head.ports['8265']}"
    stranger = {**{k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}, "HOME": str(tmp_path)}
    refused = subprocess.run(["ray", "job", "list", "--address", address], env=stranger, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout

    output = tmp_path / "out.jsonl"
    done = head.submit(output)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "batch: 4 lines, 3 done, 1 failed" in done.stdout
    records = {r["custom_id"]: r for r in read_records(output)}
    assert sorted(records) == ["chat-image", "chat-text", "completion", "embedding"]
    for cid, kind in (("chat-image", "chat.completion"), ("chat-text", "chat.completion"),
                      ("completion", "text_completion")):
        response = records[cid]["response"]
        assert records[cid]["error"] is None and response["status_code"] == 200
        assert response["body"]["object"] == kind and response["body"]["model"] == "demo"
        assert response["body"]["usage"]["completion_tokens"] >= 1
    bad = records["embedding"]
    assert bad["response"] is None and bad["error"]["code"] == "unsupported_url" and bad["error"]["line"] == 4


NUM_REQUESTS = 36


def write_mixed_inputs(path: Path) -> list[str]:
    """Chat (some with images) and completion lines, and five lines the server cannot run;
    returns every line's resume key."""
    lines: list[str] = []
    for i in range(NUM_REQUESTS):
        if i % 3 == 2:
            req = {"url": "/v1/completions", "body": {"model": "demo", "prompt": f"Item {i} is", "max_tokens": 128}}
        else:
            content: list[dict] = [{"type": "text", "text": f"Tell me about item {i}."}]
            if i % 6 == 0:
                content.append({"type": "image_url", "image_url": {"url": data_url(png_bytes(32, 32, (i, 40, 90)))}})
            req = {"url": "/v1/chat/completions",
                   "body": {"model": "demo", "max_tokens": 128, "messages": [{"role": "user", "content": content}]}}
        lines.append(json.dumps({"custom_id": f"r{i:02d}", "method": "POST", **req}))
    chat = {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    lines[5:5] = ['{"custom_id": "torn", "method": "PO']
    lines[11:11] = [json.dumps({"custom_id": "empty", "method": "POST", "url": "/v1/chat/completions",
                                "body": {**chat, "messages": []}})]
    lines[17:17] = [json.dumps({"custom_id": "other-model", "method": "POST", "url": "/v1/chat/completions",
                                "body": {**chat, "model": "gpt-4o"}})]
    lines[23:23] = [json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": chat})]
    lines.append(json.dumps({"custom_id": "old-url", "method": "POST", "url": "/v1/embeddings", "body": chat}))
    path.write_text("\n".join(lines) + "\n")
    return sorted([f"r{i:02d}" for i in range(NUM_REQUESTS)] + ["line:6", "empty", "other-model", "line:24",
                                                                 "old-url"])


def test_openai_batch_stopped_midway_and_resubmitted(head, tmp_path):
    inputs, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    keys = write_mixed_inputs(inputs)
    job = f"batch-{os.getpid()}"
    first = head.submit(output, extra=["--no-wait", f"--submission-id={job}"], job_args=["--concurrency", "1"],
                        input_path=str(inputs))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # Slow enough (one request at a time, 128 tokens each) to be stopped midway.
    wait_until(lambda: len(read_records(output)) >= 6, timeout_s=400, interval_s=0.2)
    address = f"http://127.0.0.1:{head.ports['8265']}"
    stopped = head.run(["ray", "job", "stop", "--address", address, job], timeout_s=120)
    assert stopped.returncode == 0, stopped.stderr
    written = output.read_text().splitlines()
    assert 6 <= len(written) < len(keys)  # really stopped midway

    second = head.submit(output, job_args=["--concurrency", "4"], input_path=str(inputs))
    assert second.returncode == 0 and "succeeded" in second.stdout, second.stdout[-3000:] + second.stderr[-3000:]
    records = read_records(output)
    assert sorted(record_key(r) for r in records) == keys  # every custom_id (and keyless line) exactly once
    kept = [line for line in written if line.endswith("}")]
    assert output.read_text().splitlines()[:len(kept) - 1] == kept[:len(kept) - 1]  # earlier answers kept
    by_key = {record_key(r): r for r in records}
    for i in range(NUM_REQUESTS):
        r = by_key[f"r{i:02d}"]
        assert r["error"] is None and r["response"]["body"]["usage"]["completion_tokens"] >= 1, r
    assert by_key["empty"]["response"]["status_code"] == 400
    assert by_key["other-model"]["response"]["status_code"] == 404
    assert by_key["other-model"]["error"]["type"] == "not_found_error"
    for key, code in (("line:6", "invalid_json"), ("line:24", "missing_required_parameter"),
                      ("old-url", "unsupported_url")):
        assert by_key[key]["response"] is None and by_key[key]["error"]["code"] == code
    assert f"batch: {len(keys)} lines, {NUM_REQUESTS} done, 5 failed" in second.stdout
