"""GPU-only: decode through CUDA graphs equals eager decode and transformers (tiny, fp32)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.helpers import TEXT, HFReference, image, prompt_ids

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return tiny_checkpoint("qwen3_vl")


def _prompts(tok):
    return [
        {"prompt_token_ids": prompt_ids(tok, TEXT, 0)},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 1), "images": [image(64, 96, 0)]},
        {"prompt_token_ids": prompt_ids(tok, "Models generate", 0)},
    ]


def test_cuda_graph_decode_equals_eager_and_transformers(path):
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    kwargs = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=8)
    with LLM(path, enforce_eager=True, **kwargs) as eager:
        prompts = _prompts(eager.tokenizer)
        ref = [o.token_ids for o in eager.generate(prompts, greedy)]
    with LLM(path, **kwargs) as graphed:
        runner = graphed.engine.executor.runner
        assert runner.graphs is not None, "CUDA graph capture failed (see the warning)"
        got = [o.token_ids for o in graphed.generate(prompts, greedy)]
        seeded = SamplingParams(max_tokens=16, temperature=0.9, seed=1, ignore_eos=True)
        a = graphed.generate(prompts, seeded)
        b = graphed.generate(prompts[:1], seeded)
        assert a[0].token_ids == b[0].token_ids
    assert got == ref
    hf = HFReference(path)
    tok_ref, _ = hf.greedy(prompts[1]["prompt_token_ids"], prompts[1]["images"], 32)
    assert ref[1] == tok_ref


def test_bf16_runs_with_memory_sized_cache(path):
    with LLM(path, device="cuda", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3) as llm:
        assert llm.engine.executor.num_blocks > 100
        out = llm.generate(_prompts(llm.tokenizer), SamplingParams(max_tokens=8, temperature=0))
        assert all(len(o.token_ids) >= 1 for o in out)
        assert torch.cuda.is_available()
