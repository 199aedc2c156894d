"""The Serve app with the real `engine.Engine` on a tiny Qwen3-VL, against transformers.

Five apps on one Serve instance: "real" (vision + LLM, API key on), "colo" (the same
with `llm.colocate_ingress`: the ingress replica owns the engine), "colov" (colocated
with `vision.colocate_llm` too: the tower in that replica, no vision deployment), "colovp"
(the same with `llm.engine_process`: engine and tower in the engine process) and
"text" (`disable_vision_encoder`, colocated too: the text-only layout of one process).
Greedy answers over HTTP must equal transformers' own `generate` on the same
checkpoint, image included, in every layout, and the colocated layouts must answer
what the LLM deployment's does: tokens, logprobs, error envelopes, batch lines.
"""

from __future__ import annotations

import inspect

import httpx
import openai
import pytest
import torch

from tests.deployments.helpers import data_url, png_bytes, run_tiny_app, tiny_checkpoint_fixture

KEY = "sekret-key"


ckpt = tiny_checkpoint_fixture("qwen3_vl")


@pytest.fixture(scope="module")
def urls(serve_instance, ckpt):
    llm = {"max_model_len": 512, "num_gpu_blocks": 96, "max_num_seqs": 8}
    return {
        "real": run_tiny_app(serve_instance, ckpt, "real", llm, api_key=KEY),
        "colo": run_tiny_app(serve_instance, ckpt, "colo", {**llm, "colocate_ingress": True}, api_key=KEY),
        "colov": run_tiny_app(serve_instance, ckpt, "colov", {**llm, "colocate_ingress": True}, api_key=KEY,
                              vision={"num_cpus": 0.1, "colocate_llm": True}),
        "colovp": run_tiny_app(serve_instance, ckpt, "colovp",
                               {**llm, "colocate_ingress": True, "engine_process": True},
                               api_key=KEY, vision={"num_cpus": 0.1, "colocate_llm": True}),
        "text": run_tiny_app(serve_instance, ckpt, "text", {**llm, "colocate_ingress": True},
                             disable_vision_encoder=True),
    }


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from models.processor import ImageProcessor, load_image

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    processor = ImageProcessor.from_pretrained(ckpt)
    pad = model.config.image_token_id

    def generate(template_messages, images, max_new_tokens):
        text = tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        kwargs = {}
        if images:
            processed = processor.preprocess([load_image(b) for b in images])
            counts = iter(processor.num_image_tokens(g) for g in processed.grid_thw)
            ids = [x for t in ids for x in ([t] * next(counts) if t == pad else [t])]
            kwargs = {"pixel_values": processed.pixel_values, "image_grid_thw": processed.grid_thw}
        input_ids = torch.tensor([ids])
        if images and "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
            # transformers >= 5.2x places image tokens' mRoPE positions only when told which they are.
            kwargs["mm_token_type_ids"] = (input_ids == pad).int()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        new = out[0, len(ids):].tolist()
        return len(ids), tokenizer.decode(new, skip_special_tokens=True), new

    return generate


def test_api_key(urls):
    body = {"model": "real", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = httpx.post(f"{urls['real']}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{urls['real']}/v1/models").status_code == 401
    assert httpx.get(f"{urls['real']}/health").status_code == 200  # open for probes


IMAGE = png_bytes(64, 96, (30, 160, 90))
IMAGE_MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                               {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}]


def test_greedy_image_chat_matches_offline_engine(urls, ckpt):
    """Serve path (vision replica -> object store -> LLM replica) == engine.LLM in one process."""
    from engine import SamplingParams
    from engine.llm import LLM

    client = openai.OpenAI(base_url=f"{urls['real']}/v1", api_key=KEY, max_retries=0)
    resp = client.chat.completions.create(model="real", max_tokens=8, temperature=0, messages=IMAGE_MESSAGES)
    llm = LLM(model=str(ckpt), dtype="float32", device="cpu", max_model_len=512)
    try:
        out = llm.generate([{"messages": IMAGE_MESSAGES}], SamplingParams(max_tokens=8, temperature=0))[0]
    finally:
        llm.shutdown()
    assert resp.choices[0].message.content == out.text
    assert resp.usage.completion_tokens == len(out.token_ids)


@pytest.mark.parametrize("app", ["real", "colo", "colov", "colovp"])
def test_greedy_image_chat_matches_transformers(urls, hf, app):
    image = IMAGE
    client = openai.OpenAI(base_url=f"{urls[app]}/v1", api_key=KEY, max_retries=0)
    resp = client.chat.completions.create(
        model=app, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                               {"type": "image_url", "image_url": {"url": data_url(image)}}]}],
    )
    prompt_len, text, new = hf([{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                             {"type": "image"}]}], [image], 8)
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.usage.completion_tokens == len(new)
    assert resp.choices[0].message.content == text


@pytest.mark.parametrize("app", ["real", "text", "colo", "colov", "colovp"])
def test_greedy_text_stream_matches_transformers(urls, hf, app):
    client = openai.OpenAI(base_url=f"{urls[app]}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Describe the weather tomorrow."}]
    chunks = list(client.chat.completions.create(model=app, max_tokens=10, temperature=0, messages=messages,
                                                 stream=True, stream_options={"include_usage": True}))
    _, text, new = hf(messages, [], 10)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(new)


def test_logprobs(urls):
    client = openai.OpenAI(base_url=f"{urls['text']}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="text", max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                          messages=[{"role": "user", "content": "Hello"}])
    items = resp.choices[0].logprobs.content
    assert len(items) == 3
    for item in items:
        assert len(item.top_logprobs) == 2
        # Greedy: the sampled token is the most likely one.
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-5)


def test_text_only_rejects_images(urls):
    from ray import serve

    client = openai.OpenAI(base_url=f"{urls['text']}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="text", max_tokens=2,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "x"},
                {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}],
        )
    assert "vision encoder" in str(info.value) or "language_model_only" in str(info.value)
    assert info.value.body["code"] == "vision_encoder_disabled"
    assert set(serve.status().applications["text"].deployments) == {"OpenAIIngress"}  # colocated, no vision
    resp = client.chat.completions.create(model="text", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert resp.usage.completion_tokens >= 1


@pytest.mark.parametrize("app", ["real", "colo", "colov", "colovp"])
def test_timeline_through_the_handles(urls, ckpt, app):
    """`LLMServer.timeline` (the ingress' own with colocation) and `VisionEncoder.timeline` (the ingress'
    `vision_timeline` with the tower in it or in its engine process) over Serve's handles: one image chat's steps (its output count,
    decode rows) and its one tower call (images, patches)."""
    from ray import serve

    from deployments.app import engine_deployment
    from models.processor import ImageProcessor, load_image
    from tests.deployments.conftest import wait_until

    llm = serve.get_deployment_handle(engine_deployment(app), app)
    vision = (llm.vision_timeline if app in ("colov", "colovp") else
              serve.get_deployment_handle("VisionEncoder", app).timeline)
    mark = llm.timeline.remote(1 << 62).result().cursor
    vision_mark = vision.remote(1 << 62).result().cursor
    image = png_bytes(96, 64, (11, 22, 33))  # not seen before: no embedding or prefix-cache hit
    client = openai.OpenAI(base_url=f"{urls[app]}/v1", api_key=KEY, max_retries=0)
    resp = client.chat.completions.create(
        model=app, max_tokens=5, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": "What is this?"}]}])
    assert resp.usage.completion_tokens == 5

    def read():  # a step's record follows the delivery of its outputs
        got = llm.timeline.remote(mark).result()
        return got if sum(r.outputs for r in got.records) == 5 else None

    steps = wait_until(read, timeout_s=10)
    assert steps.dropped == 0 and steps.cursor == mark + len(steps.records)
    # The first token comes from the prompt's last chunk, each later one from a decode row.
    assert sum(r.decode_rows for r in steps.records) == 4
    assert 0 < sum(r.prefill_tokens for r in steps.records) <= resp.usage.prompt_tokens
    assert all(r.start <= r.end for r in steps.records)
    (encode,) = vision.remote(vision_mark).result().records
    grid = ImageProcessor.from_pretrained(ckpt).preprocess([load_image(image)]).grid_thw[0]
    assert encode.images == 1 and encode.patches == int(grid.prod())
    # One node: the tower call ran before the request's first step.
    assert encode.end <= steps.records[0].start


@pytest.mark.parametrize("app", ["colov", "colovp"])
def test_vision_in_the_replica_reuses_a_cached_encode(urls, app):
    """On "colov" the embedding cache holds the in-process tower's result, on "colovp" the router's holds
    the resized pixels and the engine process' the embeddings: the same image again (another time) is not
    encoded again, and both chats answer what "real" does."""
    from ray import serve

    ingress = serve.get_deployment_handle("OpenAIIngress", app)
    mark = ingress.vision_timeline.remote(1 << 62).result().cursor
    image = png_bytes(72, 88, (7, 99, 201))
    body = {"max_tokens": 6, "extra_body": {"ignore_eos": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                      {"type": "text", "text": "Again?"}]}]}
    first, again, ref = (_chat(urls, name, False, **body)[:2] for name in (app, app, "real"))
    assert first == again
    assert [t for t, _ in first[1]] == [t for t, _ in ref[1]] and first[0] == ref[0]
    assert len(ingress.vision_timeline.remote(mark).result().records) == 1


def test_colocated_ingress_owns_the_engine_and_aborts_closed_streams(urls):
    """"colo" has no LLMServer deployment; a client that leaves a stream early aborts its engine request
    (the in-process stream's close), and the engine's blocks all come back."""
    from ray import serve

    from deployments.app import engine_deployment
    from tests.deployments.conftest import wait_until

    assert set(serve.status().applications["colo"].deployments) == {"OpenAIIngress", "VisionEncoder"}
    assert set(serve.status().applications["colov"].deployments) == {"OpenAIIngress"}
    assert set(serve.status().applications["colovp"].deployments) == {"OpenAIIngress"}
    assert engine_deployment("colo") == "OpenAIIngress" and engine_deployment("real") == "LLMServer"
    ingress = serve.get_deployment_handle("OpenAIIngress", "colo")
    client = openai.OpenAI(base_url=f"{urls['colo']}/v1", api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="colo", max_tokens=400, temperature=0, extra_body={"ignore_eos": True}, stream=True,
        messages=[{"role": "user", "content": "Count slowly."}])
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 2:
            break
    assert ingress.stats.remote().result()["num_running"] == 1
    stream.close()

    def idle():
        stats = ingress.stats.remote().result()
        return stats if stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"] else None

    assert wait_until(idle, timeout_s=20)


def _chat(urls: dict[str, str], app: str, stream: bool, **body) -> tuple[str, list[tuple[str, float]], int]:
    """(text, (token, logprob) per generated token, completion tokens) of one greedy chat on `app`."""
    client = openai.OpenAI(base_url=f"{urls[app]}/v1", api_key=KEY, max_retries=0)
    resp = client.chat.completions.create(model=app, temperature=0, logprobs=True, stream=stream, **body,
                                          **({"stream_options": {"include_usage": True}} if stream else {}))
    if not stream:
        choice = resp.choices[0]
        return choice.message.content, [(t.token, t.logprob) for t in choice.logprobs.content], \
            resp.usage.completion_tokens
    chunks = list(resp)
    parts = [c.choices[0] for c in chunks if c.choices]
    tokens = [(t.token, t.logprob) for p in parts if p.logprobs for t in p.logprobs.content]
    return "".join(p.delta.content or "" for p in parts), tokens, chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("app", ["colo", "colov", "colovp"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_colocated_image_chat_is_the_llm_deployments(urls, stream, app):
    """Greedy image chat on "colo" (engine in the ingress), "colov" (the tower there too) and "colovp" (engine
    and tower in the engine process) == on "real"
    (the LLMServer and VisionEncoder deployments): the same tokens, text and logprobs, streamed or not."""
    image = png_bytes(80, 56, (200, 120, 10))
    body = {"max_tokens": 12, "extra_body": {"ignore_eos": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                      {"type": "text", "text": "Describe it."}]}]}
    text, tokens, count = _chat(urls, app, stream, **body)
    ref_text, ref_tokens, ref_count = _chat(urls, "real", stream, **body)
    assert count == ref_count == 12 and len(tokens) == 12
    assert text == ref_text
    assert [t for t, _ in tokens] == [t for t, _ in ref_tokens]
    assert [lp for _, lp in tokens] == pytest.approx([lp for _, lp in ref_tokens], abs=1e-5)


BAD_BODIES = {
    # refused by the engine (in the colocated process, or the LLM replica): context_length_exceeded
    "prompt-too-long": {"max_tokens": 4, "messages": [{"role": "user", "content": "lorem ipsum " * 400}]},
    "no-messages": {"max_tokens": 4, "messages": []},  # refused by the router
    "bad-image": {"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]},
    "bad-temperature": {"max_tokens": 4, "temperature": -1, "messages": [{"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_colocated_bad_input_gets_the_llm_deployments_envelope(urls, name):
    """The 4xx envelopes of the colocated layouts are the LLM deployment layout's, byte for byte but the model."""
    answers = {}
    for app in ("real", "colo", "colov", "colovp"):
        resp = httpx.post(f"{urls[app]}/v1/chat/completions", json={"model": app, **BAD_BODIES[name]},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert 400 <= resp.status_code < 500 and "Traceback" not in resp.text, resp.text
        answers[app] = (resp.status_code, resp.text.replace(app, "APP"))
    assert answers["colo"] == answers["colov"] == answers["colovp"] == answers["real"]
    if name == "prompt-too-long":
        assert '"context_length_exceeded"' in answers["colo"][1]


def test_batch_lines_on_the_colocated_app(urls):
    """`deployments.batch.run_one` over the colocated ingress' handle answers what HTTP does (a success,
    an engine refusal, an unknown model), and the engine is left empty."""
    import asyncio
    import json

    from ray import serve

    from deployments.batch import run_one
    from deployments.batch_format import parse_line

    ingress = serve.get_deployment_handle("OpenAIIngress", "colo")
    chat = {"model": "colo", "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                      {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}]}
    cases = [chat, BAD_BODIES["prompt-too-long"] | {"model": "colo"}, {**chat, "model": "other"}]
    for i, body in enumerate(cases):
        http = httpx.post(f"{urls['colo']}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        line = parse_line(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                      "body": body}), i + 1)
        record = asyncio.run(run_one(ingress, line))
        expected, response = http.json(), record["response"]
        assert response["status_code"] == http.status_code, (record, expected)
        assert (http.status_code == 200) == (i == 0) and (http.status_code == 400) == (i == 1), expected
        if http.status_code == 200:
            assert record["error"] is None
            for key in ("id", "created"):
                response["body"].pop(key), expected.pop(key)
        else:
            assert record["error"] == expected["error"]
        assert response["body"] == expected
    stats = ingress.stats.remote().result()
    assert stats["num_running"] == stats["num_waiting"] == 0
