"""Greedy decoding over model-dtype logits (no fp32 copy) equals the fp32-logits path, end to end on CPU."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.helpers import TEXT, prompt_ids


def _widening(compute_logits):
    """The LM head as it was before: logits widened to fp32 whatever the caller asks for."""
    return lambda hidden, dtype=torch.float32: compute_logits(hidden, torch.float32)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_bf16_greedy_equals_fp32_logits_path(tiny_checkpoint, arch):
    with LLM(tiny_checkpoint(arch), dtype="bfloat16", max_model_len=256, num_gpu_blocks=64) as llm:
        tok = llm.tokenizer
        prompts = [{"prompt_token_ids": prompt_ids(tok, TEXT[: 12 * (i + 1)], 0)} for i in range(4)]
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        runner = llm.engine.executor.runner
        seen: list[torch.dtype] = []
        head = runner.model.compute_logits

        def recording(hidden, dtype=torch.float32):
            out = head(hidden, dtype)
            seen.append(out.dtype)
            return out

        runner.model.compute_logits = recording
        got = [o.token_ids for o in llm.generate(prompts, greedy)]
        assert set(seen) == {torch.bfloat16}  # the greedy steps took the model-dtype logits
        runner.model.compute_logits = _widening(head)
        want = [o.token_ids for o in llm.generate(prompts, greedy)]
    assert got == want
    assert all(len(t) == 12 for t in got)
