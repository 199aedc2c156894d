"""The Serve app on a model directory without weights (`load_format: dummy` in llm and vision).

Both replicas make their random weights in place; a greedy image chat over HTTP must equal
transformers' `generate` on a checkpoint holding those same values (written by the test).
"""

from __future__ import annotations

import shutil

import openai
import pytest
import torch

from deployments.config import AppConfig
from tests.deployments.helpers import data_url, png_bytes, run_tiny_app
from tests.engine.helpers import dummy_values_checkpoint

IMAGE = png_bytes(80, 64, (30, 160, 90))
QUESTION = "Describe the picture."
SEED = 5


@pytest.fixture(scope="module")
def dummy_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("dummy-serve") / "qwen3_vl"
    shutil.copytree(tiny_checkpoint("qwen3_vl"), out, ignore=shutil.ignore_patterns("*.safetensors*"))
    return out


@pytest.fixture(scope="module")
def url(serve_instance, dummy_dir):
    llm = {"max_model_len": 512, "num_gpu_blocks": 64, "max_num_seqs": 4, "load_format": "dummy"}
    return run_tiny_app(serve_instance, dummy_dir, "dummy", llm, seed=SEED,
                        vision={"num_cpus": 0.1, "load_format": "dummy"})


def _transformers_answer(ckpt, max_new_tokens: int) -> tuple[int, str]:
    """(prompt tokens, greedy text) from transformers on our preprocessing."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from models.processor import ImageProcessor, load_image

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    processor = ImageProcessor.from_pretrained(ckpt)
    pad = model.config.image_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    processed = processor.preprocess([load_image(IMAGE)])
    count = processor.num_image_tokens(processed.grid_thw[0])
    ids = [x for t in tokenizer.encode(text, add_special_tokens=False) for x in ([t] * count if t == pad else [t])]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=processed.pixel_values,
            image_grid_thw=processed.grid_thw, mm_token_type_ids=(input_ids == pad).int(),
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        )
    return len(ids), tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_image_chat_on_dummy_weights_matches_transformers(url, dummy_dir, tmp_path):
    assert not list(dummy_dir.glob("*.safetensors*"))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="dummy", max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                               {"type": "text", "text": QUESTION}]}],
    )
    prompt_len, text = _transformers_answer(dummy_values_checkpoint(dummy_dir, tmp_path / "ckpt", SEED), 10)
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.usage.completion_tokens == 10
    assert resp.choices[0].message.content == text


@pytest.mark.parametrize("section", ["llm", "vision"])
def test_unknown_load_format_names_the_field(dummy_dir, section):
    with pytest.raises(ValueError, match=rf"{section}\.load_format\n  Input should be 'auto' or 'dummy'"):
        AppConfig.model_validate({"model": str(dummy_dir), section: {"load_format": "pt"}})
