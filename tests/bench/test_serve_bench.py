"""bench/serve.py and decode.py's TP path on CPU: real Ray Serve over HTTP, tiny models, seconds.

Keeps the GPU benchmark code from rotting: the load generator, the /metrics
histogram deltas, the embedding-transfer actors, the random-checkpoint
tokenizer and the TP=2 engine path all run here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import decode, serve
from bench.checkpoints import write_padded_tokenizer
from bench.load import parse_histograms

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for this module's Serve app and TP workers (saves a start)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "SPLITVL_REFERENCE_OPS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def test_serve_bench_tiny_over_http(local_ray, capsys, tmp_path) -> None:
    out = tmp_path / "serve.json"
    payload = serve.main([
        "--tiny", "qwen3_vl", "--config", str(REPO / "configs/bench/serve-cpu-smoke.yaml"),
        "--concurrency", "1,2", "--image-size", "64", "--output-len", "6", "--min-requests", "2",
        "--warmup", "1", "--overhead-probes", "2", "--transfer-iters", "1", "--no-hf", "--json", str(out),
        "--client-procs", "2",
    ])
    assert json.loads(out.read_text())["runs"][0]["layout"] == "serve-cpu-smoke"
    (run,) = payload["runs"]
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 2]
    assert [lv["client_procs"] for lv in run["levels"]] == [1, 2]  # c=2: one stream in each of two processes
    for level in run["levels"]:
        assert level["errors"] == 0, level["first_error"]
        assert level["requests"] == max(2, 2 * level["concurrency"])
        assert level["output_tok_s"] > 0 and level["ttft_p50_ms"] > 0
        # The LLM replica's own histograms reached /metrics and are below the HTTP numbers.
        assert 0 < level["engine_ttft_p50_ms"] and level["engine_ttft_mean_ms"] < level["ttft_mean_ms"]
        assert level["embed_wait_mean_ms"] >= 0
        # The level's step timeline: each request's 6 tokens are its prompt's last chunk and 5 decode
        # rows, and its one (distinct) image is one tower image; raw records go to the JSON.
        tl = level["timeline"]
        assert tl["dropped_steps"] == 0 and tl["summary"]["steps"] == len(tl["steps"]) > 0
        assert sum(r["decode_rows"] for r in tl["steps"]) == level["requests"] * (6 - 1)
        assert sum(r["outputs"] for r in tl["steps"]) == level["requests"] * 6
        assert sum(r["images"] for r in tl["encodes"]) == level["requests"]
        assert 0 <= tl["summary"]["idle_frac"] < 1 and 0 <= tl["summary"]["vision_overlap_frac"] <= 1
        # Where the image chat's TTFT goes: the same disjoint parts, the LLM replica's being its wait + TTFT.
        parts = level["breakdown_mean_ms"]
        assert all(v >= 0 for v in parts.values()), parts
        assert sum(parts.values()) == pytest.approx(level["ttft_mean_ms"])
    assert not math.isnan(run["overhead"]["ray_overhead_mean_ms"])
    # The breakdown's parts are disjoint intervals of one request, each measured where it happens
    # (client, ingress, router, LLM replica): all present, none negative, and they add up to the TTFT.
    parts = run["overhead"]["breakdown_mean_ms"]
    assert set(parts) == {"outside_ingress", "body_read", "router", "llm_call", "engine_ttft", "rest"}
    assert all(v >= 0 for v in parts.values()), parts
    assert sum(parts.values()) == pytest.approx(run["overhead"]["http_ttft_mean_ms"])
    assert run["transfer"]["bytes"] > 0 and run["transfer"]["get_gb_s"] > 0
    printed = capsys.readouterr().out
    assert "Time to first token" in printed
    assert "LLM replica step timeline per level" in printed and "host time per step by phase" in printed
    saved = json.loads(out.read_text())["runs"][0]["levels"]
    assert [len(lv["timeline"]["steps"]) for lv in saved] == [len(lv["timeline"]["steps"]) for lv in run["levels"]]


@pytest.mark.parametrize("layout", ["serve-cpu-colocated-vision", "serve-cpu-colocated-vision-process"])
def test_serve_bench_with_the_tower_in_the_llm_replica(local_ray, tmp_path, layout) -> None:
    """The `vision.colocate_llm` layouts (the tower in the replica, or in its engine process): no transfer
    row (nothing moves), the tower's calls read from the ingress (`vision_timeline`): one image per request.
    `--step-tokens`: one run per engine step budget, which every step keeps (prompt chunks + decode rows)."""
    payload = serve.main([
        "--tiny", "qwen3_vl", "--config", str(REPO / f"configs/bench/{layout}.yaml"),
        "--concurrency", "2", "--image-size", "64", "--output-len", "4", "--min-requests", "3",
        "--warmup", "1", "--overhead-probes", "1", "--no-hf", "--json", str(tmp_path / "serve.json"),
        "--step-tokens", "16", "4096",
    ])
    assert [run["layout"] for run in payload["runs"]] == [f"{layout}@16", f"{layout}@4096"]
    for run in payload["runs"]:
        (level,) = run["levels"]
        assert level["errors"] == 0, level["first_error"]
        assert run["transfer"] is None
        assert sum(r["images"] for r in level["timeline"]["encodes"]) == level["requests"] == 4
        steps = level["timeline"]["steps"]
        assert all(r["prefill_tokens"] + r["decode_rows"] <= run["step_tokens"] for r in steps)
    # a prompt of the tiny chat template + a 64px image is several 16-token chunks, one step at 4096
    assert max(r["prefill_tokens"] for r in payload["runs"][1]["levels"][0]["timeline"]["steps"]) > 16


def test_decode_tp_arguments() -> None:
    args = decode.parse_args(["--models", "qwen3-vl-8b", "--tp", "1,2", "--batches", "1"])
    assert args.tp == [1, 2] and args.batches == [1]
    assert decode.parse_args(["--tp", "1", "2", "--batches", "1,8", "32"]).batches == [1, 8, 32]
    with pytest.raises(SystemExit):
        decode.parse_args(["--smoke", "--tp", "1,2"])


def test_decode_custom_all_reduce_variants() -> None:
    """`--custom-ar both` runs each TP > 1 size over NCCL then with the one-shot all-reduce; TP=1 once;
    each build once per PDL setting."""
    assert decode.parse_args(["--tp", "1,2"]).custom_ar == "off"
    args = decode.parse_args(["--tp", "1,2", "--custom-ar", "both", "--pdl", "on"])
    assert decode.variants(args.tp, args.custom_ar, args.pdl) == [(1, False, True), (2, False, True), (2, True, True)]
    assert decode.variants([1, 2, 4], "on", [False]) == [(1, False, False), (2, True, False), (4, True, False)]
    assert decode.variants([2], "off", [True]) == [(2, False, True)]
    assert decode.variants([1], "off", [True, False]) == [(1, False, True), (1, False, False)]
    with pytest.raises(SystemExit):
        decode.parse_args(["--custom-ar", "sometimes"])


def test_decode_tp2_smoke(local_ray, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPLITVL_REFERENCE_OPS", "1")
    decode.smoke(tp=2)
    assert "smoke ok: tp 2" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen3-vl-2b", "qwen3.5-0.8b"])
def test_random_checkpoint_tokenizer_uses_the_config_ids(tmp_path, name) -> None:
    from transformers import AutoTokenizer

    config = json.loads((REPO / "configs/models" / f"{name}.json").read_text())
    write_padded_tokenizer(tmp_path, config)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                      {"type": "text", "text": "What is this?"}]}],
        tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    start = ids.index(config["vision_start_token_id"])
    assert ids[start + 1] == config["image_token_id"] and ids[start + 2] == config["vision_end_token_id"]
    assert len(tok) == config["text_config"]["vocab_size"]
    assert isinstance(tok.decode(list(range(len(tok) - 5, len(tok)))), str)


def test_histogram_quantiles_match_numpy() -> None:
    """The /metrics parser against numpy on the same samples, through our own exposition."""
    from deployments.metrics import FINE_LATENCY_BUCKETS, MetricsRecorder, render_prometheus

    rng = np.random.default_rng(0)
    values = rng.uniform(0.0011, 0.0029, 400)  # all inside the 1-2-3 ms buckets
    recorders = [MetricsRecorder("LLMServer", f"r{i}") for i in range(2)]
    for i, v in enumerate(values):
        recorders[i % 2].observe("splitvl_engine_time_to_first_token_seconds", float(v), FINE_LATENCY_BUCKETS)
    hist = parse_histograms(render_prometheus([r.snapshot() for r in recorders]))[
        "splitvl_engine_time_to_first_token_seconds"]
    assert hist.count == len(values)
    assert hist.mean == pytest.approx(values.mean())
    assert hist.quantile(0.5) == pytest.approx(np.median(values), abs=2e-4)


def test_run_gpu_script_parses_and_rejects_unknown_steps(tmp_path) -> None:
    import subprocess

    script = REPO / "bench" / "run_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), "nosuchstep"], capture_output=True, text=True,
                         env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "BENCH_GPUS": "0"})
    assert bad.returncode == 2 and "unknown step" in bad.stderr


def test_dummy_load_format_writes_no_weights_and_reaches_both_replicas(tmp_path) -> None:
    """`--load-format dummy` on the full MoE shape: a weightless directory the app reads, and
    `load_format: dummy` in the layout's llm and vision sections."""
    from bench.checkpoints import prepare_checkpoint
    from deployments.config import AppConfig
    from models.config import load_model_config
    from models.processor import ImageProcessor

    ckpt = prepare_checkpoint("qwen3-vl-30b-a3b", tmp_path, weights=False)
    assert not list(ckpt.glob("*.safetensors*")) and (ckpt / "tokenizer.json").is_file()
    config_json = json.loads((REPO / "configs/models/qwen3-vl-30b-a3b.json").read_text())
    assert load_model_config(ckpt).text.num_hidden_layers == config_json["text_config"]["num_hidden_layers"]
    ImageProcessor.from_pretrained(ckpt)
    layout = REPO / "configs/bench/serve-one-gpu.yaml"
    config = AppConfig.model_validate(serve.layout_args(layout, ckpt, "bench", "dummy"))
    plain = AppConfig.model_validate(serve.layout_args(layout, ckpt, "bench"))
    assert config.llm.load_format == config.vision.load_format == "dummy"
    assert plain.llm.load_format == plain.vision.load_format == "auto"
    assert config.model_copy(update={"llm": plain.llm, "vision": plain.vision}) == plain  # nothing else changed


def test_serve_env_and_client_arguments() -> None:
    opts = serve.parse_args(["--serve-env", "RAY_SERVE_THROUGHPUT_OPTIMIZED=1", "A=b=c", "--client-procs", "4",
                             "--ramp-s", "2.5"])
    assert opts.serve_env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "A": "b=c"}
    assert (opts.client_procs, opts.ramp_s) == (4, 2.5)
    assert serve.parse_args([]).serve_env == {} and serve.parse_args([]).client_procs == 0
    with pytest.raises(SystemExit):
        serve.parse_args(["--serve-env", "NOVALUE"])


def test_every_layout_validates_and_fits_its_gpus() -> None:
    """Each `--layout` YAML is a valid app whose replicas' GPU shares fit the GPUs Ray gets for it."""
    from deployments.config import AppConfig
    from deployments.llm import LLMServer

    for name, gpus in serve.LAYOUT_GPUS.items():
        config = AppConfig.model_validate(serve.layout_args(REPO / f"configs/bench/serve-{name}.yaml",
                                                            REPO / "configs", "bench"))
        opts = LLMServer.deployment_options(config)
        per_replica = sum(b.get("GPU", 0.0) for b in opts.get("placement_group_bundles", [])) or \
            opts["ray_actor_options"]["num_gpus"]
        # vision.colocate_llm: the tower runs on the LLM replica's share
        vision = 0.0 if config.vision.colocate_llm else config.vision.num_replicas * config.vision.num_gpus
        needed = vision + config.llm.num_replicas * per_replica
        assert 0 < needed <= gpus, (name, needed, gpus)
        assert name in serve.TRANSFER_GPUS or config.vision.colocate_llm
        assert config.llm.engine_process == name.endswith("-process")
    assert serve.LAYOUT_GPUS["tp2-process"] == 2
