"""Greedy generation through `engine.LLM` vs transformers' `generate`, and engine invariants."""

from __future__ import annotations

import torch

from engine import SamplingParams
from tests.engine.helpers import TEXT, HFReference, arch_llm_fixture, assert_greedy_matches, image, prompt_ids

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def _cases(tok):
    return {
        "text": (prompt_ids(tok, TEXT, 0), []),
        "one_image": (prompt_ids(tok, TEXT, 1), [image(64, 96, 0)]),
        "two_images": (prompt_ids(tok, TEXT, 2), [image(96, 64, 1), image(128, 128, 2)]),
    }


arch_llm = arch_llm_fixture(["qwen3_vl", "qwen3_vl_moe"])


def test_greedy_matches_transformers(arch_llm):
    path, llm = arch_llm
    hf = HFReference(path)
    assert_greedy_matches(llm, hf, _cases(llm.tokenizer), GREEDY)
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_logprobs_match_transformers(arch_llm):
    path, llm = arch_llm
    hf = HFReference(path)
    ids, imgs = _cases(llm.tokenizer)["one_image"]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
    out = llm.generate([{"prompt_token_ids": ids, "images": imgs}], params)[0]
    ref_tokens, ref_logits = hf.greedy(ids, imgs, max_new_tokens=4)
    ref = ref_logits.float().log_softmax(-1)
    assert out.token_ids == ref_tokens
    for step, lp in enumerate(out.logprobs):
        assert lp.token_id == ref_tokens[step]
        assert abs(lp.logprob - ref[step, lp.token_id].item()) < 1e-4
        top_vals, top_ids = ref[step].topk(3)
        assert list(lp.top_ids) == top_ids.tolist()
        assert torch.allclose(torch.tensor(lp.top_logprobs), top_vals, atol=1e-4)
