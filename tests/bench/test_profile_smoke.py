"""bench/profile.py's CPU smoke mode: the profiling script imports, runs and writes its tables."""

import json

from bench import profile


def test_profile_bench_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "profile.json"
    profile.main(["--smoke", "--json", str(out)])
    assert "smoke ok" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert [r["batch"] for r in payload["decode"]] == [1, 4]
    for r in payload["decode"]:
        assert r["steps"] >= 1 and r["top_kernels"]
        phases = r["host_phases_ms_per_step"]
        assert {"schedule", "message", "execute (model step)", "process outputs"} <= set(phases)
    assert payload["vision"]["top_kernels"]
    (ttft,) = payload["ttft"]
    assert ttft["prompt_tokens"] > 4 and ttft["steps"] >= 1 and ttft["top_kernels"]
    assert ttft["preprocess_ms"] > 0 and ttft["tower_ms"] > 0 and ttft["request_ms"] > 0
    stages = ttft["request_stages_ms"]
    assert list(stages) == list(profile.REQUEST_STAGES)
    assert stages["prepare (preprocess + tower + inputs)"] > 0 and stages["its steps"] > 0
