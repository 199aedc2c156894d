"""Units without Ray: config, schema + limits, prompt building, detokenizer, cache, metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.config import AppConfig, args_from_serve_yaml
from deployments.detokenize import IncrementalDetokenizer
from deployments.embedding_cache import EmbeddingCache
from deployments.errors import InvalidRequestError, ServiceUnavailableError, pydantic_error_to_api
from deployments.metrics import MetricsRecorder, parse_prometheus, render_prometheus
from deployments.prompt import chat_prompt_ids, check_limits, expand_image_pads, sampling_params
from deployments.protocol import ChatCompletionRequest
from deployments.config import LimitsConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint("qwen3_vl")))


def test_config_typo_names_the_field(tmp_path):
    with pytest.raises(ValidationError, match="max_batch_sise"):
        AppConfig.model_validate({"model": str(tmp_path), "vision": {"max_batch_sise": 4}})
    with pytest.raises(ValidationError, match="num_replicas or autoscaling_config"):
        AppConfig.model_validate(
            {"model": str(tmp_path), "llm": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}
        )
    with pytest.raises(ValidationError, match="not a directory"):
        AppConfig.model_validate({"model": str(tmp_path / "missing")})
    with pytest.raises(ValidationError, match="allowed_media_networks"):
        AppConfig.model_validate({"model": str(tmp_path), "limits": {"allowed_media_networks": ["nope"]}})
    with pytest.raises(ValidationError, match="unknown tiny architecture 'llama'.*qwen3_vl"):
        AppConfig.model_validate({"create_tiny_if_missing": "llama"})


def test_config_alias_and_defaults(tmp_path, monkeypatch):
    cfg = AppConfig.model_validate({"model": str(tmp_path), "language_model_only": True})
    assert cfg.disable_vision_encoder and cfg.served_model_id == tmp_path.name
    monkeypatch.setenv("SPLITVL_API_KEY", "k1")
    assert cfg.resolved_api_key() == "k1"
    assert AppConfig.model_validate({"model": str(tmp_path), "api_key": "k2"}).resolved_api_key() == "k2"


def test_removed_router_in_ingress_key_is_refused(tmp_path):
    """One Serve graph: the router always runs in the ingress; the old switch is a typo-style error."""
    for key, value in (("router_in_ingress", True), ("router_replicas", 2)):
        with pytest.raises(ValidationError, match=f"{key}\n  Extra inputs are not permitted"):
            AppConfig.model_validate({"model": str(tmp_path), key: value})


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("**/*.yaml")
                                        if "cluster" not in p.parts))
def test_shipped_configs_validate(name):
    import yaml

    data = yaml.safe_load((CONFIGS / name).read_text())
    args = args_from_serve_yaml(data)
    if not args.get("model") or not Path(args["model"]).expanduser().exists():
        # Weights not on CI; the bench configs get their model from bench/serve.py.
        args = {**args, "model": None, "create_tiny_if_missing": args.get("create_tiny_if_missing", "qwen3_vl")}
    AppConfig.model_validate(args)
    assert data["applications"][0]["import_path"] == "deployments.app:build_app"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}]},
         "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "top_k": -2}, "top_k"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_schema_rejects(body, param):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    err = pydantic_error_to_api(info.value)
    assert err.status == 400 and err.param is not None and err.param.startswith(param)
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_limits():
    limits = LimitsConfig(max_tokens_limit=100, max_n=2, max_stop_strings=2)
    msg = [{"role": "user", "content": "x"}]
    for extra, param in [({"max_tokens": 101}, "max_tokens"), ({"n": 3}, "n"), ({"stop": ["a", "b", "c"]}, "stop")]:
        with pytest.raises(InvalidRequestError) as info:
            check_limits(ChatCompletionRequest.model_validate({"messages": msg, **extra}), limits)
        assert info.value.param == param
    req = ChatCompletionRequest.model_validate({"messages": msg})
    # Without max_tokens: what the context leaves (None: the engine's own default), capped by the limit.
    assert sampling_params(req, 10, 64, limits, 1000).max_tokens is None
    assert sampling_params(req, 10, 500, limits, 1000).max_tokens == 100
    req = ChatCompletionRequest.model_validate({"messages": msg, "max_tokens": 60, "seed": 7,
                                                "stop_token_ids": [3], "temperature": 0.5})
    params = sampling_params(req, 10, 64, limits, 1000, seed_offset=2)
    assert (params.max_tokens, params.seed, params.stop_token_ids, params.temperature) == (60, 9, (3,), 0.5)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        sampling_params(req.model_copy(update={"stop_token_ids": [1000]}), 10, 64, limits, 1000)


def test_engine_context_length_error_is_the_400_with_its_code(tiny_checkpoint):
    """The engine's check is the one context-length check; LLMServer answers it as a 400 envelope."""
    import asyncio

    from deployments.llm import LLMServer
    from engine.sampling_params import SamplingParams
    from tests.deployments.scripted_engine import ScriptedEngine

    config = {"model": str(tiny_checkpoint("qwen3_vl")), "device": "cpu", "llm": {"max_model_len": 64}}
    server = LLMServer(config, engine_cls=ScriptedEngine)

    async def first(ids, max_tokens):
        return await anext(server.generate("r", ids, SamplingParams(max_tokens=max_tokens)))

    for ids, max_tokens, param in (([5] * 64, None, "prompt"), ([5] * 10, 60, "max_tokens")):
        with pytest.raises(InvalidRequestError) as info:
            asyncio.run(first(ids, max_tokens))
        assert (info.value.status, info.value.code, info.value.param) == (400, "context_length_exceeded", param)
    delta = asyncio.run(first([5] * 10, None))
    assert delta.token_ids and delta.server_s is not None


def test_prompt_ids_match_the_template(tokenizer):
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
    ]})
    ids = chat_prompt_ids(tokenizer, req)
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is this?"
            "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expanded = expand_image_pads(ids, pad, [5])
    assert expanded.count(pad) == 5 and len(expanded) == len(ids) + 4
    with pytest.raises(InvalidRequestError, match="placeholder"):
        expand_image_pads(ids, pad, [5, 5])


def test_detokenizer_matches_full_decode_and_stops(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. Hello! How can I help you today?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([t]).text for t in ids] + [detok.add([], final=True).text]
    assert "".join(pieces) == tokenizer.decode(ids)
    detok = IncrementalDetokenizer(tokenizer, stop=["lazy dog", "How"])
    out, stopped = "", False
    for t in ids:
        delta = detok.add([t])
        out += delta.text
        if delta.stopped:
            stopped = True
            break
    assert stopped and out == "The quick brown fox jumps over the "


class _GenericTokenizer:
    """The tokenizer behind transformers' own `decode` only (the detokenizer's generic path)."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def test_detokenizer_backend_decode_equals_transformers_decode(tokenizer):
    """The Rust-backend fast path gives the same deltas as `tokenizer.decode`, over random ids
    (special tokens, split multi-byte characters) and stop strings."""
    import random

    from deployments.detokenize import window_decoder

    assert window_decoder(tokenizer).__code__ is not window_decoder(_GenericTokenizer(tokenizer)).__code__
    rng = random.Random(0)
    text = "naïve café — 東京 🙂 "
    for trial in range(40):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 24))]
        ids[rng.randrange(len(ids)):rng.randrange(len(ids) + 1)] = tokenizer.encode(text, add_special_tokens=False)
        stop = [text[3:7]] if trial % 2 else None
        runs = []
        for tok in (tokenizer, _GenericTokenizer(tokenizer)):
            detok = IncrementalDetokenizer(tok, stop, prompt_tail=ids[:2])
            runs.append([(d.text, d.stopped) for d in (detok.add([t]) for t in ids[2:])]
                        + [(detok.add([], final=True).text, False)])
        assert runs[0] == runs[1]


def test_embedding_cache_is_lru_in_bytes():
    cache = EmbeddingCache(100)
    cache.put("a", "ref-a", 40)
    cache.put("b", "ref-b", 40)
    assert cache.get("a") == "ref-a"  # a is now most recent
    cache.put("c", "ref-c", 40)  # evicts b
    assert cache.get("b") is None and cache.get("a") == "ref-a" and cache.nbytes == 80
    cache.put("huge", "x", 1000)
    assert cache.get("huge") is None


def test_metrics_render_and_parse():
    rec = MetricsRecorder("Router", "r1")
    rec.inc("splitvl_embedding_cache_hits_total", 2)
    rec.observe("splitvl_time_to_first_token_seconds", 0.03)
    rec.set("splitvl_kv_cache_usage", 0.25)
    text = render_prometheus([rec.snapshot()])
    assert '# TYPE splitvl_time_to_first_token_seconds histogram' in text
    assert 'splitvl_time_to_first_token_seconds_bucket{deployment="Router",replica="r1",le="0.05"} 1' in text
    totals = parse_prometheus(text)
    assert totals["splitvl_embedding_cache_hits_total"] == 2
    assert totals["splitvl_time_to_first_token_seconds_count"] == 1


def test_chat_template_kwargs_reach_the_template(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    plain = chat_prompt_ids(tokenizer, ChatCompletionRequest.model_validate({"messages": messages}))
    no_think = chat_prompt_ids(tokenizer, ChatCompletionRequest.model_validate(
        {"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}))
    assert plain == tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                                     add_special_tokens=False)
    assert no_think == tokenizer.encode(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", add_special_tokens=False)
    for key in ("add_generation_prompt", "tokenize", "not an identifier"):
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate({"messages": messages, "chat_template_kwargs": {key: True}})
        err = pydantic_error_to_api(info.value)
        assert err.param == "chat_template_kwargs" and "cannot be set through chat_template_kwargs" in err.message


def test_unsupported_openai_fields_refused_unless_they_ask_for_nothing():
    from deployments.protocol import ChatCompletionRequest, CompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    # The values that ask for the default behaviour pass (clients send some of them always).
    ChatCompletionRequest.model_validate({**chat, "tools": [], "tool_choice": "none", "logit_bias": {},
                                          "response_format": {"type": "text"}, "modalities": ["text"],
                                          "min_tokens": 0, "skip_special_tokens": True, "use_beam_search": False,
                                          "add_generation_prompt": True, "continue_final_message": False})
    CompletionRequest.model_validate({"prompt": "x", "best_of": 1, "suffix": "", "include_stop_str_in_output": False})
    refused = [
        (ChatCompletionRequest, {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (ChatCompletionRequest, {**chat, "tool_choice": "auto"}, "tool_choice"),
        (ChatCompletionRequest, {**chat, "response_format": {"type": "json_schema"}}, "response_format"),
        (ChatCompletionRequest, {**chat, "logit_bias": {"1": -100}}, "logit_bias"),
        (ChatCompletionRequest, {**chat, "guided_json": {"type": "object"}}, "guided_json"),
        (ChatCompletionRequest, {**chat, "modalities": ["text", "audio"]}, "modalities"),
        (CompletionRequest, {"prompt": "x", "best_of": 4}, "best_of"),
        (CompletionRequest, {"prompt": "x", "suffix": "end"}, "suffix"),
        # vLLM's extensions: dropping them would answer another request
        (CompletionRequest, {"prompt": "x", "min_tokens": 5}, "min_tokens"),
        (CompletionRequest, {"prompt": "x", "include_stop_str_in_output": True}, "include_stop_str_in_output"),
        (ChatCompletionRequest, {**chat, "skip_special_tokens": False}, "skip_special_tokens"),
        (ChatCompletionRequest, {**chat, "prompt_logprobs": 1}, "prompt_logprobs"),
        (ChatCompletionRequest, {**chat, "bad_words": ["x"]}, "bad_words"),
        (ChatCompletionRequest, {**chat, "add_generation_prompt": False}, "add_generation_prompt"),
        (ChatCompletionRequest, {**chat, "continue_final_message": True}, "continue_final_message"),
        (ChatCompletionRequest, {**chat, "chat_template": "{{ messages }}"}, "chat_template"),
    ]
    ChatCompletionRequest.model_validate({**chat, "stream": True,
                                          "stream_options": {"include_usage": True, "continuous_usage_stats": False}})
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({**chat, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    err = pydantic_error_to_api(info.value)
    assert err.param == "stream_options.continuous_usage_stats" and "is not supported" in err.message
    for schema, body, field in refused:
        with pytest.raises(ValidationError) as info:
            schema.model_validate(body)
        err = pydantic_error_to_api(info.value)
        assert (err.status, err.param) == (400, field)
        assert err.message == f"{field}: `{field}` is not supported by this server"


def test_request_json_refuses_deep_nesting_and_lone_surrogates():
    from deployments.batch_format import parse_line
    from deployments.protocol import loads_request

    # a surrogate pair is one character; raw UTF-8 and plain escapes pass
    assert loads_request(b'{"a": "\\ud83d\\ude00 \\u00e9"}') == {"a": "\U0001F600 \u00e9"}
    assert loads_request('{"a": ["\u00e9"]}') == {"a": ["\u00e9"]}
    for body, reason in [
        (b'{"messages": [{"content": "\\ud800"}]}', "lone UTF-16 surrogate"),
        ('{"stop": ["x\\udfff"]}', "lone UTF-16 surrogate"),
        (b'{"\\udc00": 1}', "lone UTF-16 surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": ', "Expecting value"),
        (b'{"a": "\xff"}', "malformed JSON"),
    ]:
        with pytest.raises(ValueError, match=reason):
            loads_request(body)
        if reason != "malformed JSON":  # a batch file's line is text already
            line = parse_line(body.decode() if isinstance(body, bytes) else body, 7)
            assert line.error is not None and line.error.code == "invalid_json" and reason in line.error.message


def test_every_recorded_metric_is_described_and_documented():
    import re

    from deployments.metrics import HELP

    root = Path(__file__).resolve().parents[2]
    source = "\n".join(p.read_text() for p in (root / "deployments").glob("*.py"))
    recorded = set(re.findall(r'\.(?:observe|inc|set)\(\s*"(splitvl_\w+)"', source))
    assert {"splitvl_llm_call_overhead_seconds", "splitvl_ingress_body_read_seconds"} <= recorded
    assert recorded <= set(HELP), recorded - set(HELP)
    readme = (root / "README.md").read_text()
    assert [name for name in HELP if f"`{name}`" not in readme] == []


def test_errors_pickle_through_ray_boundaries():
    import pickle

    err = pickle.loads(pickle.dumps(ServiceUnavailableError("busy", param="x", code="overloaded")))
    assert err.status == 503 and err.param == "x" and err.body()["error"]["code"] == "overloaded"


class ActorDiedError(Exception):
    """Named like Ray's."""


class ObjectLostError(Exception):
    """Named like Ray's."""


class BackPressureError(Exception):
    """Named like Serve's."""


class RayTaskError(Exception):
    """Ray's wrapper of a remote exception: the original is its `cause`."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


@pytest.mark.parametrize("exc, status, code", [
    (InvalidRequestError("bad", "x"), 400, None),
    (RayTaskError(InvalidRequestError("bad", "x", code="context_length_exceeded")), 400, "context_length_exceeded"),
    (TimeoutError(), 408, "request_timeout"),
    (BackPressureError(), 503, "overloaded"),
    (ActorDiedError(), 503, "service_unavailable"),
    (ObjectLostError(), 503, "service_unavailable"),
    (RuntimeError("boom"), 500, "internal_error"),
])
def test_one_classifier_maps_failures_to_api_errors(exc, status, code):
    from deployments.errors import as_api_error

    err = as_api_error(exc)
    assert (err.status, err.code) == (status, code)
    assert "Traceback" not in err.message


def test_cluster_files_carry_a_valid_serve_config():
    import yaml

    service = yaml.safe_load((CONFIGS / "cluster" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    args = args_from_serve_yaml(serve_config)
    AppConfig.model_validate({**args, "model": None, "create_tiny_if_missing": "qwen3_vl"})
    assert serve_config["applications"][0]["import_path"] == "deployments.app:build_app"
    launcher = yaml.safe_load((CONFIGS / "cluster" / "cluster.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])


def test_cluster_files_start_every_node_with_haproxy():
    """HAProxy ingress is read by Serve's controller at `ray start`: every node and pod carries it.
    The replicas' own switches (deployments.app.REPLICA_SERVE_ENV) come with the app, not from here."""
    import yaml

    from deployments.app import REPLICA_SERVE_ENV

    launcher = yaml.safe_load((CONFIGS / "cluster" / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in launcher[key] if "ray start" in c]
        assert starts and all("RAY_SERVE_ENABLE_HA_PROXY=1 ray start" in c for c in starts), key
    ray_cluster = yaml.safe_load((CONFIGS / "cluster" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    groups = [ray_cluster["headGroupSpec"], *ray_cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", container["name"]
            # Process-wide, a handle router on the caller's loop breaks handles used from sync code.
            assert not set(env) & set(REPLICA_SERVE_ENV), container["name"]


def test_replica_env_is_added_to_every_deployment_and_the_build_env_wins(monkeypatch):
    from deployments.app import REPLICA_SERVE_ENV, with_replica_env

    for key in REPLICA_SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
    opts = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"A": "b"}}}}
    out = with_replica_env(opts)
    assert out["ray_actor_options"]["runtime_env"]["env_vars"] == {"A": "b", **REPLICA_SERVE_ENV}
    assert out["ray_actor_options"]["num_cpus"] == 1 and out["num_replicas"] == 2
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"] == {"A": "b"}  # not modified in place
    assert REPLICA_SERVE_ENV == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                 "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
    monkeypatch.setenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "1")
    env = with_replica_env({})["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}


def test_llm_placement_bundles(tmp_path):
    from deployments.llm import LLMServer, engine_config_values

    cfg = AppConfig.model_validate({"model": str(tmp_path), "device": "cuda",
                                    "llm": {"tensor_parallel_size": 2, "num_cpus": 2}})
    opts = LLMServer.deployment_options(cfg)
    assert opts["placement_group_bundles"] == [{"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    cfg = AppConfig.model_validate({"model": str(tmp_path), "device": "cuda", "llm": {"gpus_per_worker": 0.5}})
    assert LLMServer.deployment_options(cfg)["ray_actor_options"]["num_gpus"] == 0.5
    with pytest.raises(ValidationError, match="two ranks could land on one GPU"):
        AppConfig.model_validate({"model": str(tmp_path), "llm": {"gpus_per_worker": 0.5, "tensor_parallel_size": 2}})
    cfg = AppConfig.model_validate({"model": str(tmp_path), "device": "cuda",
                                    "llm": {"tensor_parallel_size": 2, "gpus_per_worker": 0.8}})
    assert LLMServer.deployment_options(cfg)["placement_group_bundles"] == [{"GPU": 0.8, "CPU": 1.0}, {"GPU": 0.8}]
    assert engine_config_values(cfg, "m")["gpus_per_rank"] == 0.8


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_image_embedding_pickles_as_numpy_and_round_trips(dtype):
    """ImageEmbedding travels as NumPy buffers (zero-copy out of Ray's object store), exact."""
    import pickle

    import numpy as np
    import torch

    from deployments.vision import ImageEmbedding

    dt = getattr(torch, dtype)
    emb = ImageEmbedding(torch.randn(6, 8).to(dt), torch.randn(3, 6, 8).to(dt), (1, 4, 6))
    fn, args = emb.__reduce__()
    assert all(isinstance(a, np.ndarray) for a in args[:2])
    back = pickle.loads(pickle.dumps(emb, protocol=5))
    assert back.embeds.dtype == dt and back.grid_thw == (1, 4, 6)
    assert torch.equal(back.embeds, emb.embeds) and torch.equal(back.deepstack, emb.deepstack)
    empty = ImageEmbedding(torch.randn(6, 8).to(dt), torch.empty(0, 6, 8, dtype=dt), (1, 4, 6))
    assert pickle.loads(pickle.dumps(empty, protocol=5)).deepstack.shape == (0, 6, 8)


def test_image_embedding_is_read_from_the_object_store_without_a_copy():
    import ray
    import torch

    from deployments.llm import merge_images
    from deployments.vision import ImageEmbedding

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        # 2 MB: above Ray's inline limit, so the object lives in the shared-memory store.
        emb = ImageEmbedding(torch.randn(256, 1024).to(torch.bfloat16),
                             torch.randn(3, 256, 1024).to(torch.bfloat16), (1, 32, 32))
        ref = ray.put(emb)
        back, again = ray.get(ref), ray.get(ref)
        # Both gets map the same store memory (a copying unpickle would give two buffers).
        assert back.embeds.data_ptr() == again.embeds.data_ptr()
        assert back.deepstack.data_ptr() == again.deepstack.data_ptr()
        merged = merge_images([back, back])  # consumers copy; the store's memory is never written
        assert torch.equal(merged.image_embeds, torch.cat([emb.embeds, emb.embeds]))
        assert torch.equal(merged.deepstack_embeds, torch.cat([emb.deepstack, emb.deepstack], dim=1))
    finally:
        ray.shutdown()


def test_router_merges_waiting_deltas_of_one_choice():
    import asyncio

    from deployments.messages import ChoiceDelta, TextLogprob
    from deployments.router import _ChoiceDone, _merge_waiting_deltas

    def lp(token):
        return (TextLogprob(token, -1.0),)

    queue: asyncio.Queue = asyncio.Queue()
    done = _ChoiceDone(0, 3)
    for item in (ChoiceDelta(0, "b", lp("b")), ChoiceDelta(0, "c", lp("c"), "length"), done):
        queue.put_nowait(item)
    pending: list = []
    merged = _merge_waiting_deltas(ChoiceDelta(0, "a", lp("a")), queue, pending)
    assert merged == ChoiceDelta(0, "abc", lp("a") + lp("b") + lp("c"), "length")
    assert pending == [] and queue.get_nowait() == done  # stops at the finished delta

    for item in (ChoiceDelta(0, "y"), ChoiceDelta(1, "other"), ChoiceDelta(0, "z")):
        queue.put_nowait(item)
    merged = _merge_waiting_deltas(ChoiceDelta(0, "x"), queue, pending)
    assert merged == ChoiceDelta(0, "xy") and pending == [ChoiceDelta(1, "other")] and queue.qsize() == 1
    error = RuntimeError("lost")
    queue.put_nowait(error)
    held: list = []
    assert _merge_waiting_deltas(ChoiceDelta(0, "q"), queue, held) == ChoiceDelta(0, "qz")
    assert held == [error] and queue.empty()


def test_logprobs_take_the_openai_shapes_in_one_place():
    """Chat: `{"content": [...]}` with bytes; completions: the legacy parallel lists, offsets into the text."""
    from deployments.messages import ChoiceDelta, TextLogprob
    from deployments.protocol import choice_dict

    items = (TextLogprob("Hi", -0.5, (("Hi", -0.5), ("Yo", -1.5))), TextLogprob(" é", -0.25, ((" é", -0.25),)))
    delta = ChoiceDelta(0, "Hi é", items, "length")
    chat = choice_dict(True, False, delta)
    assert chat["message"] == {"role": "assistant", "content": "Hi é"} and chat["finish_reason"] == "length"
    first = chat["logprobs"]["content"][1]
    assert first["token"] == " é" and first["bytes"] == list(" é".encode()) and first["logprob"] == -0.25
    assert [t["token"] for t in chat["logprobs"]["content"][0]["top_logprobs"]] == ["Hi", "Yo"]
    legacy = choice_dict(False, True, delta, text_offset=5)["logprobs"]
    assert legacy == {"tokens": ["Hi", " é"], "token_logprobs": [-0.5, -0.25],
                      "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}, {" é": -0.25}], "text_offset": [5, 7]}
    assert choice_dict(True, True, ChoiceDelta(1, "x")) == {"index": 1, "delta": {"content": "x"},
                                                           "logprobs": None, "finish_reason": None}


def test_colocated_ingress_takes_the_llm_options(tmp_path):
    """`llm.colocate_ingress`: the ingress gets the LLM's replicas, GPU resources, placement group, health
    checks and queue bound (plus room for control requests); `ingress_replicas` conflicts with it."""
    from deployments.app import CONTROL_REQUESTS, colocated_ingress_options
    from deployments.llm import LLMServer

    cfg = AppConfig.model_validate({"model": str(tmp_path), "device": "cuda", "llm": {
        "colocate_ingress": True, "tensor_parallel_size": 2, "num_replicas": 3, "max_ongoing_requests": 40,
        "max_queued_requests": 7}})
    opts, llm = colocated_ingress_options(cfg), LLMServer.deployment_options(cfg)
    assert opts["placement_group_bundles"] == llm["placement_group_bundles"] == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}]
    ongoing = 40 + 7 + CONTROL_REQUESTS
    assert (opts["num_replicas"], opts["max_queued_requests"], opts["max_ongoing_requests"]) == (3, ongoing, ongoing)
    assert opts["health_check_period_s"] == llm["health_check_period_s"]
    one = colocated_ingress_options(AppConfig.model_validate(
        {"model": str(tmp_path), "device": "cuda", "llm": {"colocate_ingress": True, "gpus_per_worker": 0.8}}))
    assert one["ray_actor_options"]["num_gpus"] == 0.8
    with pytest.raises(ValidationError, match=r"ingress_replicas=2 does not match the LLM's replicas \(1\)"):
        AppConfig.model_validate({"model": str(tmp_path), "ingress_replicas": 2, "llm": {"colocate_ingress": True}})
    with pytest.raises(ValidationError, match=r"ingress_replicas=3 does not match the LLM's replicas \(autoscaled\)"):
        AppConfig.model_validate({"model": str(tmp_path), "ingress_replicas": 3, "llm": {
            "colocate_ingress": True, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}})
    same = {"model": str(tmp_path), "ingress_replicas": 3, "llm": {"colocate_ingress": True, "num_replicas": 3}}
    assert AppConfig.model_validate(same).ingress_replicas == 3  # says what colocation does anyway
    assert AppConfig.model_validate({"model": str(tmp_path), "ingress_replicas": 2}).ingress_replicas == 2


def test_vision_in_the_llm_replica_needs_the_engine_in_the_ingress_process(tmp_path):
    """`vision.colocate_llm` puts the tower in the process that runs the engine: the colocated ingress (the
    engine in process, or in its engine process) with one rank; that engine then steps on a high-priority
    stream, and others do not."""
    from deployments.llm import engine_config_values

    base = {"model": str(tmp_path), "vision": {"colocate_llm": True}}
    for llm, got in (({}, "colocate_ingress: false, tensor_parallel_size: 1"),
                     ({"engine_process": True}, "colocate_ingress: false, tensor_parallel_size: 1"),
                     ({"colocate_ingress": True, "tensor_parallel_size": 2},
                      "colocate_ingress: true, tensor_parallel_size: 2"),
                     ({"colocate_ingress": True, "engine_process": True, "tensor_parallel_size": 2},
                      "colocate_ingress: true, tensor_parallel_size: 2")):
        with pytest.raises(ValidationError) as info:
            AppConfig.model_validate({**base, "llm": llm})
        assert "vision.colocate_llm runs the tower beside the engine" in str(info.value)
        assert "llm.colocate_ingress: true and llm.tensor_parallel_size: 1" in str(info.value)
        assert f"(got {got})" in str(info.value)
    process = AppConfig.model_validate({**base, "llm": {"colocate_ingress": True, "engine_process": True}})
    assert process.vision.colocate_llm and process.llm.engine_process
    assert engine_config_values(process, "m")["high_priority_stream"] is True
    cfg = AppConfig.model_validate({**base, "llm": {"colocate_ingress": True}})
    assert engine_config_values(cfg, "m")["high_priority_stream"] is True
    text_only = AppConfig.model_validate({**base, "llm": {"colocate_ingress": True}, "disable_vision_encoder": True})
    assert engine_config_values(text_only, "m")["high_priority_stream"] is False
    plain = AppConfig.model_validate({"model": str(tmp_path), "llm": {"colocate_ingress": True}})
    assert engine_config_values(plain, "m")["high_priority_stream"] is False
