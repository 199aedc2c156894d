"""CI-sized soak: `python -m bench.soak` against the demo app for 45 s (issue 8).

The demo config (real engine on the tiny Qwen3-VL) with a small embedding-cache
budget, so the cache evicts throughout. Asserts zero errors, every actor's RSS
growth after the warm-up within a bound, and everything released at the end:
KV blocks all free, no request left in the engine, the cache within budget.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.deployments.helpers import REPO, stop_process, subprocess_env

CACHE_BUDGET = 96 * 1024  # bytes: a few dozen tiny-ViT images, far fewer than the 64 cycled through
MAX_GROWTH_MIB = 64.0


@pytest.mark.slow  # in the default run (and CI); deselect with -m 'not slow'
def test_soak_short(tmp_path):
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["applications"][0]["args"]["embedding_cache_bytes"] = CACHE_BUDGET
    config = tmp_path / "soak.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "bench.soak", "--config", str(config), "--concurrency", "4", "--minutes", "0.75",
           "--images", "64", "--sample-s", "3", "--warmup-frac", "0.25", "--max-rss-growth-mib", str(MAX_GROWTH_MIB),
           "--json", str(out)]
    log = (tmp_path / "soak.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.wait(timeout=420)  # hang guard: a 45 s run plus startup
    finally:
        stop_process(proc, grace_s=5)
        log.close()
    text = (tmp_path / "soak.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    print("\n" + text[text.index("soak: "):] if "soak: " in text else text[-2000:])
    report = json.loads(out.read_text())
    assert report["requests"] >= 20
    assert report["errors"] == 0, report["error_samples"]
    growth = report["rss_growth_mib"]
    labels = " ".join(growth)
    assert all(name in labels for name in ("LLMServer", "VisionEncoder", "OpenAIIngress")), growth
    assert all(mib <= MAX_GROWTH_MIB for mib in growth.values()), growth
    end = report["end"]
    assert end["kv_total_blocks"] > 0 and end["kv_free_blocks"] == end["kv_total_blocks"], end
    assert end["num_running"] == 0 and end["num_waiting"] == 0, end
    assert 0 < end["embedding_cache_bytes"] <= CACHE_BUDGET, end
    assert end["embedding_cache_entries"] < 64  # it evicted
    assert report["problems"] == []
