"""The Serve app on a model directory without weights (`load_format: dummy` in llm and vision).

Both replicas make their random weights in place; a greedy image chat over HTTP must equal
transformers' `generate` on a checkpoint holding those same values (written by the test).
"""

from __future__ import annotations

import openai
import pytest

from deployments.config import AppConfig
from tests.deployments.helpers import data_url, png_bytes, run_tiny_app, transformers_image_chat
from tests.engine.helpers import dummy_values_checkpoint

IMAGE = png_bytes(80, 64, (30, 160, 90))
QUESTION = "Describe the picture."
SEED = 5


@pytest.fixture(scope="module")
def dummy_dir(weightless_checkpoint):
    return weightless_checkpoint("qwen3_vl")


@pytest.fixture(scope="module")
def url(serve_instance, dummy_dir):
    llm = {"max_model_len": 512, "num_gpu_blocks": 64, "max_num_seqs": 4, "load_format": "dummy"}
    return run_tiny_app(serve_instance, dummy_dir, "dummy", llm, seed=SEED,
                        vision={"num_cpus": 0.1, "load_format": "dummy"})


def test_image_chat_on_dummy_weights_matches_transformers(url, dummy_dir, tmp_path):
    assert not list(dummy_dir.glob("*.safetensors*"))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="dummy", max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                               {"type": "text", "text": QUESTION}]}],
    )
    ckpt = dummy_values_checkpoint(dummy_dir, tmp_path / "ckpt", SEED)
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt_len, _, text = transformers_image_chat(ckpt, content, IMAGE, 10, ignore_eos=True)
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.usage.completion_tokens == 10
    assert resp.choices[0].message.content == text


@pytest.mark.parametrize("section", ["llm", "vision"])
def test_unknown_load_format_names_the_field(dummy_dir, section):
    with pytest.raises(ValueError, match=rf"{section}\.load_format\n  Input should be 'auto' or 'dummy'"):
        AppConfig.model_validate({"model": str(dummy_dir), section: {"load_format": "pt"}})
