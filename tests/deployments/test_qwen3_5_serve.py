"""The Serve app with the real engine on a tiny Qwen3.5 (hybrid Gated DeltaNet) checkpoint.

One app (vision + LLM replicas). A greedy image chat over HTTP, through the
official `openai` client, must equal transformers' own `generate` on the same
checkpoint and image; afterwards the replica holds no KV blocks.
"""

from __future__ import annotations

import openai
import pytest

from tests.deployments.conftest import wait_until
from tests.deployments.helpers import (
    data_url, png_bytes, run_tiny_app, tiny_checkpoint_fixture, transformers_image_chat,
)

IMAGE = png_bytes(96, 64, (40, 120, 200))
QUESTION = "What is in this picture?"


ckpt = tiny_checkpoint_fixture("qwen3_5")


@pytest.fixture(scope="module")
def url(serve_instance, ckpt):
    llm = {"max_model_len": 512, "num_gpu_blocks": 64, "max_num_seqs": 4}
    return run_tiny_app(serve_instance, ckpt, "qwen3_5", llm, model_id="qwen3.5-tiny")


def test_image_chat_matches_transformers(url, ckpt):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="qwen3.5-tiny", max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                               {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}],
    )
    content = [{"type": "text", "text": QUESTION}, {"type": "image"}]
    prompt_len, new, text = transformers_image_chat(ckpt, content, IMAGE, 12)
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.usage.completion_tokens == len(new) >= 1
    assert resp.choices[0].message.content == text
    # The replica gave back every KV block and linear-attention state slot.
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", "qwen3_5")
    stats = wait_until(lambda: (lambda s: s if s["num_running"] == 0 else None)(handle.stats.remote().result()))
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_free_state_slots"] == stats["num_total_state_slots"] == 4
