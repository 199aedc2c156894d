"""The Serve app with the real engine on a tiny Qwen3.5 (hybrid Gated DeltaNet) checkpoint.

One app (vision + LLM replicas). A greedy image chat over HTTP, through the
official `openai` client, must equal transformers' own `generate` on the same
checkpoint and image; afterwards the replica holds no KV blocks.
"""

from __future__ import annotations

import openai
import pytest
import torch

from tests.deployments.conftest import wait_until
from tests.deployments.helpers import data_url, png_bytes, run_tiny_app, tiny_checkpoint_fixture

IMAGE = png_bytes(96, 64, (40, 120, 200))
QUESTION = "What is in this picture?"


ckpt = tiny_checkpoint_fixture("qwen3_5")


@pytest.fixture(scope="module")
def url(serve_instance, ckpt):
    llm = {"max_model_len": 512, "num_gpu_blocks": 64, "max_num_seqs": 4}
    return run_tiny_app(serve_instance, ckpt, "qwen3_5", llm, model_id="qwen3.5-tiny")


def _transformers_answer(ckpt, max_new_tokens: int) -> tuple[int, list[int], str]:
    """(prompt tokens, greedy new tokens, their text) from transformers on our preprocessing."""
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

    from models.processor import ImageProcessor, load_image

    model = Qwen3_5ForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    processor = ImageProcessor.from_pretrained(ckpt)
    pad = model.config.image_token_id
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    processed = processor.preprocess([load_image(IMAGE)])
    count = processor.num_image_tokens(processed.grid_thw[0])
    ids = [x for t in tokenizer.encode(text, add_special_tokens=False) for x in ([t] * count if t == pad else [t])]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=processed.pixel_values,
            image_grid_thw=processed.grid_thw, mm_token_type_ids=(input_ids == pad).int(),
            max_new_tokens=max_new_tokens, do_sample=False,
        )
    new = out[0, len(ids):].tolist()
    return len(ids), new, tokenizer.decode(new, skip_special_tokens=True)


def test_image_chat_matches_transformers(url, ckpt):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="qwen3.5-tiny", max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                               {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}],
    )
    prompt_len, new, text = _transformers_answer(ckpt, 12)
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.usage.completion_tokens == len(new) >= 1
    assert resp.choices[0].message.content == text
    # The replica gave back every KV block and linear-attention state slot.
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", "qwen3_5")
    stats = wait_until(lambda: (lambda s: s if s["num_running"] == 0 else None)(handle.stats.remote().result()))
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_free_state_slots"] == stats["num_total_state_slots"] == 4
