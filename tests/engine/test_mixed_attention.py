"""Mixed steps (decode rows first, then prompt chunks) split their attention in two calls
(`models.layers.attention.PromptPart`): the engine builds the split for exactly those steps,
and generation with it equals generation with one varlen call per step."""

from __future__ import annotations

import pytest

import engine.batch_builder as batch_builder
from engine import LLM, SamplingParams
from tests.engine.helpers import TEXT, image, prompt_ids


def _generate(checkpoint, split: bool, monkeypatch) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Greedy outputs of a staggered batch (4 running, 7 prompts, 24-token step budget) and, per
    step with prompt chunks after decode rows, (decode rows, split rows) as the batch carried them."""
    monkeypatch.setattr(batch_builder, "SPLIT_MIXED_ATTENTION", split)
    llm = LLM(checkpoint, max_model_len=512, num_gpu_blocks=256, block_size=4, max_num_seqs=4,
              max_num_batched_tokens=24, async_scheduling=False)
    runner = llm.engine.executor.runner
    build, mixed = runner.build_batch, []

    def recording_build(steps):
        batch = build(steps)
        q_lens = [s.num_new_tokens for s in steps]
        leading = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
        if 0 < leading < len(q_lens):
            part = batch.attn.prompt_part
            mixed.append((leading, part.num_decodes if part is not None else 0))
        return batch

    runner.build_batch = recording_build
    tok = llm.tokenizer
    prompts = [
        {"prompt_token_ids": prompt_ids(tok, TEXT, 1), "images": [image(64, 96, 0)]},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 0)},
        {"prompt_token_ids": prompt_ids(tok, TEXT[:30], 0)},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 2), "images": [image(96, 64, 1), image(64, 64, 2)]},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 0)},
        {"prompt_token_ids": prompt_ids(tok, TEXT[:20], 1), "images": [image(64, 64, 3)]},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 0)[:7]},
    ]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3, 12, 6, 10, 5, 8)]
    try:
        outs = llm.generate(prompts, params)
    finally:
        llm.shutdown()
    return [list(o.token_ids) for o in outs], mixed


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_split_mixed_attention_equals_one_call(tiny_checkpoint, arch, monkeypatch):
    checkpoint = tiny_checkpoint(arch)
    split_tokens, split_steps = _generate(checkpoint, True, monkeypatch)
    whole_tokens, whole_steps = _generate(checkpoint, False, monkeypatch)
    assert split_tokens == whole_tokens
    # Both runs scheduled mixed steps; the split carried exactly their leading decode rows.
    assert split_steps and whole_steps
    assert all(n == leading for leading, n in split_steps)
    assert all(n == 0 for _, n in whole_steps)
