"""Video over HTTP with the official `openai` client: the Serve app with the real engine on
a tiny Qwen3-VL, against transformers' own model (fp32, greedy equal), and bad videos.

transformers gets the prompt ids `engine.LLM` builds for the same messages (their
parity with transformers' processor and models is tests/models/test_video_processor.py
and tests/engine/test_video.py) and our pixel_values_videos / video_grid_thw.
"""

from __future__ import annotations

import openai
import pytest
import torch

from tests.deployments.helpers import LocalServer, data_url, run_tiny_app, send_body, tiny_checkpoint_fixture
from tests.videos import noise_video

pytest.importorskip("av")
MODEL = "vid"


ckpt = tiny_checkpoint_fixture("qwen3_vl")


@pytest.fixture(scope="module")
def client(serve_instance, ckpt):
    llm = {"max_model_len": 1024, "num_gpu_blocks": 128, "max_num_seqs": 4}
    limits = {"allowed_media_networks": ["127.0.0.1/32"], "max_videos_per_request": 2,
              "max_video_seconds": 5.0, "max_video_frames": 100, "max_video_bytes": 100_000}
    url = run_tiny_app(serve_instance, ckpt, "video", llm, model_id=MODEL, limits=limits)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _hf_greedy(ckpt, parts: list[dict], videos: list[bytes], n: int) -> str:
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from engine import LLM
    from models.video_io import decode_video
    from models.video_processor import VideoProcessor

    llm = LLM(ckpt, max_model_len=1024, num_gpu_blocks=64)
    try:
        ids, _ = llm.prepare({"messages": [{"role": "user", "content": parts}]})
    finally:
        llm.shutdown()
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    proc = VideoProcessor.from_pretrained(ckpt)
    pv = proc.preprocess([decode_video(v, proc.sample_indices).frames for v in videos])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             mm_token_type_ids=2 * (input_ids == model.config.video_token_id).int(),
                             pixel_values_videos=pv.pixel_values, video_grid_thw=pv.grid_thw,
                             max_new_tokens=n, do_sample=False)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_video_url_data_and_http_match_transformers(client, ckpt):
    clip = noise_video(seconds=3, fps=4, height=64, width=96, seed=11)
    want = _hf_greedy(ckpt, [{"type": "video", "video": clip}, {"type": "text", "text": "What is shown?"}], [clip], 8)
    with LocalServer({"/clip.mp4": send_body(clip, content_type="video/mp4")}) as server:
        for part in ({"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}},
                     {"video_url": server.url("/clip.mp4")}):  # vLLM's plain form
            resp = client.chat.completions.create(
                model=MODEL, max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": [part, {"type": "text", "text": "What is shown?"}]}],
            )
            assert resp.choices[0].message.content == want
            assert resp.usage.prompt_tokens > 3 * 6  # three frame groups of six tokens, plus timestamps


@pytest.mark.parametrize("case,match", [
    ("garbage", "cannot decode video"),
    ("too_long", "max_video_seconds"),
    ("image_mime", "must hold an video"),
    ("too_many", "at most 2"),
    ("too_big", "larger than"),
])
def test_bad_videos_are_openai_400s(client, case, match):
    clip = noise_video(seconds=1, fps=4, height=32, width=32)
    urls = {
        "garbage": [data_url(b"\x00\x01 not a video" * 40, "video/mp4")],
        "too_long": [data_url(noise_video(seconds=6, fps=4, height=32, width=32), "video/mp4")],
        "image_mime": [data_url(clip, "image/png")],
        "too_many": [data_url(clip, "video/mp4")] * 3,
        "too_big": [data_url(b"\x00" * 120_000, "video/mp4")],
    }[case]
    content = [{"type": "video_url", "video_url": {"url": u}} for u in urls] + [{"type": "text", "text": "?"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": content}])
    assert err.value.status_code == 400
    body = err.value.response.json()["error"]
    assert match in body["message"] and body["type"] == "invalid_request_error"


def test_batch_line_with_a_video_gets_what_http_answers(client):
    """An OpenAI Batch line with a video part runs through the batch job's path (`run_one` on the
    ingress handle) and its body is the HTTP answer to the same request."""
    import asyncio
    import json

    from ray import serve

    from deployments.batch import run_one
    from deployments.batch_format import parse_line

    clip = noise_video(seconds=2, fps=4, height=64, width=64, seed=5)
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}}, {"type": "text", "text": "?"}]}]}
    http = client.chat.completions.create(**body)
    line = parse_line(json.dumps({"custom_id": "v1", "method": "POST", "url": "/v1/chat/completions", "body": body}), 1)
    record = asyncio.run(run_one(serve.get_deployment_handle("OpenAIIngress", "video"), line))
    assert record["custom_id"] == "v1" and record["error"] is None
    response = record["response"]
    assert response["status_code"] == 200
    answer = response["body"]
    assert answer["choices"][0]["message"]["content"] == http.choices[0].message.content
    assert answer["usage"]["prompt_tokens"] == http.usage.prompt_tokens > 2 * 6
