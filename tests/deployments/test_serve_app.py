"""The Serve graph over real HTTP with the official `openai` client.

One app per module: 2 VisionEncoder replicas (the real tiny ViT), 1 LLMServer
replica with the contract-conforming `ScriptedEngine` (its tokens are a pure
function of the prompt, so the expected text is computable here), and the
ingress with its router. References are computed independently in the test: prompt ids
from the tokenizer's own chat template + the processor's token counts, image
embeddings from running the vision tower directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from deployments.metrics import parse_prometheus
from tests.deployments.conftest import wait_until
from tests.deployments.helpers import LocalServer, data_url, png_bytes, send_body, tiny_checkpoint_fixture
from tests.deployments.scripted_engine import ScriptedEngine, script_tokens

APP = "vl"
MODEL_ID = "tiny-vl"


ckpt = tiny_checkpoint_fixture("qwen3_vl")


@pytest.fixture(scope="module")
def base_url(serve_instance, ckpt):
    from ray import serve

    from deployments.app import bind_app
    from deployments.config import AppConfig

    args = {
        "model": str(ckpt), "model_id": MODEL_ID, "device": "cpu", "dtype": "float32",
        "vision": {"num_replicas": 2, "num_cpus": 0.1, "max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        "llm": {"num_replicas": 1, "num_cpus": 0.1, "max_model_len": 512},
        "limits": {"allowed_media_networks": ["127.0.0.1/32"], "max_images_per_request": 3,
                   "max_image_pixels": 1_000_000, "max_request_bytes": 200_000, "max_tokens_limit": 64,
                   "max_n": 2, "max_stop_strings": 2, "media_fetch_timeout_s": 2.0, "max_prompts_per_request": 4},
    }
    serve.run(bind_app(AppConfig.model_validate(args), engine_cls=ScriptedEngine), name=APP, route_prefix="/")
    return serve_instance


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Independent references: tokenizer, processor, and the vision tower run here."""
    from transformers import AutoTokenizer

    from models.config import load_model_config
    from models.loader import CheckpointReader
    from models.processor import ImageProcessor, load_image
    from models.registry import build_vision_model

    config = load_model_config(ckpt)
    tower = build_vision_model(config, torch.float32, "cpu")
    tower.load_weights(CheckpointReader(ckpt))
    processor = ImageProcessor.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))

    class Ref:
        def prompt_ids(self, messages, images, **template_kwargs):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 **template_kwargs)
            ids = tokenizer.encode(text, add_special_tokens=False)
            counts = iter(processor.num_image_tokens(processor.grid_thw(*load_image(b).size[::-1]))
                          for b in images)
            out = []
            for t in ids:
                out.extend([t] * next(counts) if t == config.image_token_id else [t])
            return out

        def text(self, prompt_ids, max_tokens):
            return tokenizer.decode(script_tokens(prompt_ids, max_tokens), skip_special_tokens=True)

        def embeds(self, images):
            processed = processor.preprocess([load_image(b) for b in images])
            with torch.inference_mode():
                return tower(processed.pixel_values, processed.grid_thw)

    return Ref()


def llm_request(prompt_ids):
    """What the LLM replica's engine received for the request with these prompt ids."""
    from ray import serve

    stats = serve.get_deployment_handle("LLMServer", APP).stats.remote().result()
    matches = [r for r in stats["requests"].values() if r["prompt_token_ids"] == prompt_ids]
    assert matches, "the engine never saw these prompt ids"
    return matches[-1]


def metrics(base_url):
    return parse_prometheus(httpx.get(f"{base_url}/metrics").text)


def image_message(text, urls):
    return [{"role": "user", "content": [{"type": "text", "text": text}]
             + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def template_message(text, n_images):
    return [{"role": "user", "content": [{"type": "text", "text": text}] + [{"type": "image"}] * n_images}]


def test_every_replica_runs_serve_on_one_event_loop(base_url):
    """Each replica process of the app started with deployments.app.REPLICA_SERVE_ENV (Linux /proc)."""
    from deployments.app import REPLICA_SERVE_ENV

    prefix = f"ray::ServeReplica:{APP}:"
    envs: dict[str, dict[str, str]] = {}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            if title.startswith(prefix):
                raw = (proc / "environ").read_bytes().split(b"\0")
                envs[title.removeprefix(prefix).split(".")[0]] = dict(
                    item.decode().split("=", 1) for item in raw if b"=" in item)
        except OSError:  # a process that ended meanwhile
            continue
    assert set(envs) == {"OpenAIIngress", "VisionEncoder", "LLMServer"}
    for name, env in envs.items():
        assert {k: env.get(k) for k in REPLICA_SERVE_ENV} == REPLICA_SERVE_ENV, name


def test_chat_with_data_url_image(client, reference):
    image = png_bytes(64, 96, (10, 200, 30))
    resp = client.chat.completions.create(
        model=MODEL_ID, max_tokens=12, messages=image_message("What is in this picture?", [data_url(image)])
    )
    ids = reference.prompt_ids(template_message("What is in this picture?", 1), [image])
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == len(ids) + 12
    assert resp.choices[0].message.content == reference.text(ids, 12)
    assert resp.choices[0].finish_reason == "length"
    seen = llm_request(ids)
    embeds, deepstack = reference.embeds([image])
    torch.testing.assert_close(seen["image_embeds"], embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seen["deepstack_embeds"], deepstack, atol=1e-5, rtol=1e-4)


def test_stream_matches_non_stream(client, base_url, reference):
    image = png_bytes(32, 32, (1, 2, 3))
    messages = image_message("Describe the image.", [data_url(image)])
    full = client.chat.completions.create(model=MODEL_ID, max_tokens=10, messages=messages)
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, max_tokens=10, messages=messages, stream=True, stream_options={"include_usage": True}
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 10
    # Raw SSE framing ends with [DONE].
    body = {"model": MODEL_ID, "max_tokens": 3, "stream": True, "messages": messages}
    raw = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30).text
    events = [line for line in raw.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_http_image_and_two_images(client, reference):
    first, second = png_bytes(48, 48, (250, 0, 0)), png_bytes(80, 40, (0, 0, 250))
    with LocalServer({"/a.png": send_body(first)}) as server:
        resp = client.chat.completions.create(
            model=MODEL_ID, max_tokens=5,
            messages=image_message("Compare.", [server.url("/a.png"), data_url(second)]),
        )
        assert server.hits["/a.png"] == 1
    ids = reference.prompt_ids(template_message("Compare.", 2), [first, second])
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.choices[0].message.content == reference.text(ids, 5)
    embeds, _ = reference.embeds([first, second])
    torch.testing.assert_close(llm_request(ids)["image_embeds"], embeds, atol=1e-5, rtol=1e-4)


def test_text_only_multi_turn_and_completions(client, reference):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "How can I help you today?"},
                {"role": "user", "content": "Tell me about the weather."}]
    resp = client.chat.completions.create(model=MODEL_ID, max_tokens=6, messages=messages)
    ids = reference.prompt_ids(messages, [])
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.choices[0].message.content == reference.text(ids, 6)
    assert llm_request(ids)["image_embeds"] is None
    comp = client.completions.create(model=MODEL_ID, prompt="The quick brown fox", max_tokens=4)
    assert comp.choices[0].text and comp.usage.completion_tokens == 4


def test_completions_with_a_list_of_prompts(client):
    """OpenAI's batched completions: `prompt` as a list of strings or of token-id lists. Prompt i's n choices
    are indices i * n to i * n + n - 1, each the text a one-prompt request gets; usage sums the prompts; a
    stream carries the same indices and texts. Mixed lists, empty prompts and more prompts than the
    deployment's limit are 400s."""
    for prompts in (["The quick brown fox", "jumps over", "the lazy dog again"], [[5, 6, 7], [8, 9], [10]]):
        one_by_one = [client.completions.create(model=MODEL_ID, prompt=p, max_tokens=4) for p in prompts]
        batch = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=4, n=2)
        assert [c.index for c in batch.choices] == list(range(2 * len(prompts)))
        assert [c.text for c in batch.choices] == [r.choices[0].text for r in one_by_one for _ in range(2)]
        assert all(c.finish_reason == "length" for c in batch.choices)
        assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in one_by_one)
        assert batch.usage.completion_tokens == 2 * len(prompts) * 4
        texts: dict[int, str] = {}
        usage = None
        for chunk in client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=4, n=2, stream=True,
                                               stream_options={"include_usage": True}):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
            usage = chunk.usage or usage
        assert [texts[i] for i in range(2 * len(prompts))] == [c.text for c in batch.choices]
        assert usage.prompt_tokens == batch.usage.prompt_tokens
    for prompt, fragment in [(["a", [1, 2]], "only strings"), (["a", ""], "non-empty"), ([[1], []], "non-empty"),
                             (["a"] * 5, "5 prompts; at most 4")]:
        with pytest.raises(openai.BadRequestError, match=fragment):
            client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2)


def test_completions_echo(client, ckpt):
    """`echo`: each choice's text is its prompt (a token-id prompt decoded) followed by what the same request
    without echo generates, streamed or not; usage unchanged. With logprobs (they would need the prompt's) a 400."""
    from transformers import AutoTokenizer

    prompts = ["The quick brown fox", "jumps over"]
    plain = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=4, n=2)
    echoed = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=4, n=2, echo=True)
    assert [c.text for c in echoed.choices] == [prompts[i // 2] + c.text for i, c in enumerate(plain.choices)]
    assert echoed.usage == plain.usage
    texts: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=4, n=2, echo=True, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(4)] == [c.text for c in echoed.choices]
    ids = [5, 6, 7, 8]
    one = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=3, echo=True)
    alone = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=3)
    assert one.choices[0].text == AutoTokenizer.from_pretrained(str(ckpt)).decode(ids) + alone.choices[0].text
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2, echo=True, logprobs=1)


def test_batch_lines_get_what_http_answers(base_url):
    """A batch line goes through the ingress handle (`deployments.batch.run_one`) and carries the
    status and body HTTP answers for the same request: success, a refused body, an unknown model."""
    from ray import serve

    from deployments.batch import run_one
    from deployments.batch_format import parse_line

    ingress = serve.get_deployment_handle("OpenAIIngress", APP)
    chat = {"model": MODEL_ID, "max_tokens": 5, "messages": image_message("what?", [data_url(png_bytes(32, 32))])}
    comp = {"model": MODEL_ID, "prompt": "The quick brown fox", "max_tokens": 4, "stream": True}
    cases = [("/v1/chat/completions", chat), ("/v1/completions", comp),
             ("/v1/chat/completions", {**chat, "messages": []}), ("/v1/completions", {**comp, "model": "other"})]
    for i, (url, body) in enumerate(cases):
        http = httpx.post(f"{base_url}{url}", json={**body, "stream": False}, timeout=60)
        line = parse_line(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}), i + 1)
        record = asyncio.run(run_one(ingress, line))
        expected, response = http.json(), record["response"]
        assert response["status_code"] == http.status_code, (record, expected)
        if http.status_code == 200:
            assert record["error"] is None and response["request_id"] == response["body"]["id"]
            for key in ("id", "created"):
                response["body"].pop(key), expected.pop(key)
        else:
            assert record["error"] == expected["error"]
        assert response["body"] == expected


def test_models_health_metrics(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{base_url}/metrics").text
    assert "# TYPE splitvl_requests_total counter" in text
    wait_until(lambda: "splitvl_vision_batch_size_bucket" in httpx.get(f"{base_url}/metrics").text)
    totals = metrics(base_url)
    assert totals["splitvl_time_to_first_token_seconds_count"] >= 1


def test_same_image_twice_hits_the_cache(client, base_url):
    image = png_bytes(64, 64, (123, 45, 67))
    messages = image_message("Once.", [data_url(image)])
    client.chat.completions.create(model=MODEL_ID, max_tokens=2, messages=messages)
    before = wait_until(lambda: (m := metrics(base_url)).get("splitvl_embedding_cache_misses_total") and m)
    wait_until(lambda: metrics(base_url).get("splitvl_vision_images_total", 0)
               >= before["splitvl_embedding_cache_misses_total"])
    before = metrics(base_url)
    client.chat.completions.create(model=MODEL_ID, max_tokens=2, messages=image_message("Twice.", [data_url(image)]))
    after = wait_until(lambda: (m := metrics(base_url))["splitvl_embedding_cache_hits_total"]
                       > before.get("splitvl_embedding_cache_hits_total", 0) and m)
    assert after["splitvl_embedding_cache_misses_total"] == before["splitvl_embedding_cache_misses_total"]
    assert after["splitvl_vision_images_total"] == before["splitvl_vision_images_total"]


def test_concurrent_images_over_two_vision_replicas(base_url, reference):
    from ray import serve

    images = [png_bytes(32 + 32 * (i % 3), 64, (i * 20, 100, 200 - i * 10)) for i in range(8)]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(
            aclient.chat.completions.create(model=MODEL_ID, max_tokens=4,
                                            messages=image_message(f"Image {i}.", [data_url(b)]))
            for i, b in enumerate(images)
        ))

    responses = asyncio.run(run_all())
    for i, (resp, image) in enumerate(zip(responses, images)):
        ids = reference.prompt_ids(template_message(f"Image {i}.", 1), [image])
        assert resp.choices[0].message.content == reference.text(ids, 4)
        torch.testing.assert_close(llm_request(ids)["image_embeds"], reference.embeds([image])[0],
                                   atol=1e-5, rtol=1e-4)
    state = serve.get_deployment_handle("OpenAIIngress", APP).debug_state.remote().result()
    assert state["cache_value_types"] == ["ObjectRef"]
    out_hidden = 64  # the tiny ViT's out_hidden_size: no tensor of that width lives in the router
    assert not [s for s in state["live_tensor_shapes"] if s and s[-1] == out_hidden]
    status = serve.status().applications[APP].deployments["VisionEncoder"]
    assert status.replica_states.get("RUNNING") == 2


def test_chat_template_kwargs_reach_the_engine(client, reference):
    """vLLM's `chat_template_kwargs` (here Qwen3's no-think switch) through extra_body."""
    messages = [{"role": "user", "content": "Answer directly."}]
    ids = reference.prompt_ids(messages, [], enable_thinking=False)
    assert ids != reference.prompt_ids(messages, [])
    resp = client.chat.completions.create(model=MODEL_ID, max_tokens=4, messages=messages,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.choices[0].message.content == reference.text(ids, 4)
    llm_request(ids)  # the engine got exactly these prompt ids


def test_stop_string_and_n(client, reference):
    messages = [{"role": "user", "content": "Count for me."}]
    ids = reference.prompt_ids(messages, [])
    full = reference.text(ids, 20)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    resp = client.chat.completions.create(model=MODEL_ID, max_tokens=20, messages=messages, stop=[stop], n=2)
    expected = full[: full.index(stop)]
    assert [c.message.content for c in resp.choices] == [expected, expected]
    assert [c.finish_reason for c in resp.choices] == ["stop", "stop"]


def test_client_disconnect_aborts_engine_request(base_url):
    from ray import serve

    body = {"model": MODEL_ID, "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "A long answer please."}]}
    handle = serve.get_deployment_handle("LLMServer", APP)
    # Earlier tests abort requests too (a stop string ends a request early), so
    # look for the abort of a request that was not there before.
    aborted_before = set(handle.stats.remote().result()["aborted"])
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 3:
                break  # hang up mid-stream
    wait_until(lambda: set(handle.stats.remote().result()["aborted"]) - aborted_before)
    wait_until(lambda: handle.stats.remote().result()["num_running"] == 0)


def _serve_log_sizes() -> dict[Path, int]:
    """Serve's logs and the workers' stderr (where our modules' loggers write)."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())  # noqa: SLF001
    return {p: p.stat().st_size for p in [*logs.glob("serve/*.log"), *logs.glob("worker-*.err")]}


def _appended(before: dict[Path, int]) -> str:
    text = []
    for path, size in _serve_log_sizes().items():
        with path.open("rb") as f:
            f.seek(before.get(path, 0))
            text.append(f.read().decode(errors="replace"))
    return "\n".join(text)


def test_client_hang_up_mid_stream_logs_no_traceback(base_url):
    """A client leaving is normal: at most a line in the ingress' and proxy's logs, no traceback."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", APP)
    before = _serve_log_sizes()
    body = {"model": MODEL_ID, "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "Another long answer please."}]}

    def hang_up(after_lines: int) -> None:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i >= after_lines:
                    break

    # Some leave before the first token, some mid-stream, several at once (as in the GPU soak).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(hang_up, [0, 1, 2, 3, 0, 1, 2, 3] * 3))
    wait_until(lambda: handle.stats.remote().result()["num_running"] == 0)
    time.sleep(2.0)  # the replicas' log handlers flush
    text = _appended(before)
    assert "Traceback" not in text and "ExceptionGroup" not in text, text[-4000:]
    # A hang-up is a disconnect (one info line), not a failed request.
    assert "failed after its response started" not in text and "request failed:" not in text, text[-4000:]


# ---------------------------------------------------------------- bad inputs (issue 8)

GOOD_IMAGE = data_url(png_bytes(32, 32))


def _chat(**extra):
    return {"model": MODEL_ID, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **extra}


def _img(url):
    return _chat(messages=image_message("x", [url]))


def _ppm() -> bytes:
    import io

    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buf, format="PPM")
    return buf.getvalue()


BAD_INPUTS = [
    # (name, raw body or dict, headers, status, message fragment)
    ("tools", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), None, 400,
     "`tools` is not supported"),
    ("json mode", _chat(response_format={"type": "json_object"}), None, 400, "`response_format` is not supported"),
    ("logit_bias", _chat(logit_bias={"5": 100}), None, 400, "`logit_bias` is not supported"),
    ("tool call in history", _chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), None, 400, "tool_calls"),
    ("NaN temperature", b'{"model": "tiny-vl", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
     None, 400, "finite number"),
    ("stream_options without stream", _chat(stream_options={"include_usage": True}), None, 400, "stream: true"),
    ("malformed json", b'{"model": ', None, 400, "malformed JSON"),
    ("json nested too deeply", b'{"model": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None, 400, "nested too deeply"),
    ("lone surrogate", b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "\\ud800"}]}', None, 400,
     "lone UTF-16 surrogate"),
    ("min_tokens", _chat(min_tokens=4), None, 400, "`min_tokens` is not supported"),
    ("missing messages", {"model": MODEL_ID}, None, 400, "messages"),
    ("empty messages", _chat(messages=[]), None, 400, "messages"),
    ("unknown role", _chat(messages=[{"role": "wizard", "content": "x"}]), None, 400, "role"),
    ("unknown model", _chat(model="gpt-7"), None, 404, "does not exist"),
    ("image_url as string", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": "http://example.com/a.png"}]}]), None, 400, "image_url"),
    ("corrupt base64", _img("data:image/png;base64,@@@@"), None, 400, "corrupt base64"),
    ("data url not an image", _img("data:text/plain;base64,aGVsbG8="), None, 400, "must hold an image"),
    ("image bytes not an image", _img(data_url(b"not an image at all")), None, 400, "cannot decode"),
    ("unsupported format", _img(data_url(_ppm(), "image/x-portable-pixmap")), None, 400, "unsupported image format"),
    ("too many pixels", _img(data_url(png_bytes(1200, 1000))), None, 400, "limit is 1000000"),
    ("too many images", _chat(messages=image_message("x", [GOOD_IMAGE] * 4)), None, 400, "at most 3"),
    ("prompt too long", _chat(messages=[{"role": "user", "content": "word " * 600}]), None, 400, "context"),
    ("max_tokens zero", _chat(max_tokens=0), None, 400, "max_tokens"),
    ("max_tokens too large", _chat(max_tokens=65), None, 400, "max_tokens"),
    ("temperature negative", _chat(temperature=-0.5), None, 400, "temperature"),
    ("top_p zero", _chat(top_p=0), None, 400, "top_p"),
    ("top_p above one", _chat(top_p=1.1), None, 400, "top_p"),
    ("top_k below -1", _chat(top_k=-2), None, 400, "top_k"),
    ("n too large", _chat(n=3), None, 400, "n 3 exceeds"),
    ("top_logprobs out of range", _chat(logprobs=True, top_logprobs=50), None, 400, "top_logprobs"),
    ("too many stop strings", _chat(stop=["a", "b", "c"]), None, 400, "stop strings"),
    ("body too large", _chat(messages=[{"role": "user", "content": "x" * 300_000}]), None, 413, "limit"),
    ("wrong content type", b"hello", {"content-type": "text/plain"}, 400, "application/json"),
    ("image url 404", "HTTP404", None, 400, "HTTP 404"),
    ("image url wrong type", "HTML", None, 400, "content type"),
    ("image url times out", "SLOW", None, 400, "longer than 2s"),
    ("image url too large", "BIG", None, 400, "larger than"),
]


@pytest.fixture(scope="module")
def media_server():
    from tests.deployments.helpers import endless_body, slow_body

    routes = {"/page.html": send_body(b"<html/>", "text/html"), "/slow.png": slow_body(10.0),
              "/big.png": endless_body()}
    with LocalServer(routes) as server:
        yield server


@pytest.mark.parametrize("name, body, headers, status, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(base_url, media_server, name, body, headers, status, fragment):
    remote = {"HTTP404": "/missing.png", "HTML": "/page.html", "SLOW": "/slow.png", "BIG": "/big.png"}
    if isinstance(body, str):
        body = _img(media_server.url(remote[body]))
    if name == "image url too large":
        pass  # max_media_bytes default (20 MiB) is hit by the endless body
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    resp = httpx.post(f"{base_url}/v1/chat/completions", content=content, headers=hdrs, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error
    assert "Traceback" not in resp.text


def test_one_pixel_image_is_served(client):
    resp = client.chat.completions.create(model=MODEL_ID, max_tokens=2,
                                          messages=image_message("tiny", [data_url(png_bytes(1, 1))]))
    assert resp.choices[0].finish_reason == "length"


def test_private_address_refused_with_zero_hits(client):
    with LocalServer({"/secret.png": send_body(png_bytes())}, host="127.0.0.2") as target:
        with pytest.raises(openai.BadRequestError, match="non-public address"):
            client.chat.completions.create(model=MODEL_ID, max_tokens=2,
                                           messages=image_message("x", [target.url("/secret.png")]))
        assert sum(target.hits.values()) == 0
    # Still serving afterwards.
    assert client.chat.completions.create(model=MODEL_ID, max_tokens=1, messages=image_message("ok", [GOOD_IMAGE]))
