"""`load_format="dummy"`: the engine runs a model directory without any safetensors.

Reference: the same random values written as a safetensors checkpoint (transformers' key
layout, unfused) and read with `load_format="auto"` give the same greedy tokens, text and
image requests alike.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.engine import EngineConfig
from models.loader import CheckpointError
from tests.engine.helpers import TEXT, dummy_values_checkpoint, image, prompt_ids

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEED = 3


@pytest.fixture(scope="module")
def dummy_dir(weightless_checkpoint):
    return weightless_checkpoint("qwen3_vl")


def _requests(tokenizer) -> list[dict]:
    return [{"prompt_token_ids": prompt_ids(tokenizer, TEXT, 0)},
            {"prompt_token_ids": prompt_ids(tokenizer, TEXT, 1), "images": [image(64, 96, 0)]}]


def test_dummy_engine_generates_as_a_checkpoint_of_the_same_values(dummy_dir, tmp_path) -> None:
    assert not list(dummy_dir.glob("*.safetensors*"))
    dummy = LLM(dummy_dir, load_format="dummy", seed=SEED, max_model_len=512, num_gpu_blocks=64)
    try:
        requests = _requests(dummy.tokenizer)
        got = dummy.generate(requests, GREEDY)
    finally:
        dummy.shutdown()
    reference = LLM(dummy_values_checkpoint(dummy_dir, tmp_path / "ckpt", SEED), seed=SEED, max_model_len=512,
                    num_gpu_blocks=64)
    try:
        want = reference.generate(requests, GREEDY)
    finally:
        reference.shutdown()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in got)
    assert len({tuple(o.token_ids) for o in got}) == 2  # the image changed the answer


def test_auto_still_needs_the_weights(dummy_dir) -> None:
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LLM(dummy_dir, max_model_len=512, num_gpu_blocks=64)


def test_unknown_load_format_is_a_config_error(dummy_dir) -> None:
    with pytest.raises(ValueError, match="load_format must be one of \\['auto', 'dummy'\\], got 'npz'"):
        EngineConfig(model=str(dummy_dir), device="cpu", load_format="npz")
