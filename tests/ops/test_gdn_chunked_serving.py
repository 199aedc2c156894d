"""`gated_delta_rule_chunked` on the CUDA kernels at the batches serving sends, against the pure-torch
reference: image-chat prompts (~1K tokens) alone and mixed with one-token decode rows (which the op runs
on the sequential kernel, the prompts on the chunked kernels), lengths around the short-sequence bound,
initial states on and off, slot -1."""

from __future__ import annotations

import pytest
import torch

from ops import reference_linear_attn as ref
from tests.ops.common import CUDA_DTYPES, GPU, assert_close
from tests.ops.test_linear_attn import gdr_inputs, packed, slots_for, state_pool

HEADS_08B = (16, 16, 128, 128)  # configs/models/qwen3.5-0.8b.json: linear_num_{key,value}_heads, head dims

# (lengths, sequence with no slot or None); decode rows of a mixed step are length-1 sequences.
SERVING_BATCHES = [
    pytest.param([1047], None, id="1x1047"),
    pytest.param([1047] * 2 + [1] * 32, 5, id="2x1047+32x1"),
    pytest.param([1] * 16 + [1047], None, id="16x1+1x1047"),
    pytest.param([700] * 3, 1, id="3x700"),
    # more long sequences than the state pass's grid rows (4 CTAs per SM): CTAs take several in turn
    pytest.param([1, 200, 1] + [200] * 5 + [3], 0, id="6x200+3-short"),
]


def run_both(kernels, lens: list[int], heads, dtype, none_at: int | None, has_init: torch.Tensor | None):
    """(kernel out, reference out, kernel pool, reference pool) of one packed call."""
    cu = packed(lens, "cuda")
    q, k, v, g, beta = gdr_inputs(sum(lens), heads, dtype, "cuda")
    pool = state_pool(len(lens) + 2, heads, "cuda")
    slots = slots_for(len(lens), "cuda", none_at=none_at)
    expected_pool = pool.clone()
    expected = ref.gated_delta_rule_chunked(q, k, v, g, beta, cu, expected_pool, slots, has_init, True)
    out = kernels.gated_delta_rule_chunked(q, k, v, g, beta, cu, pool, slots, has_init, True)
    return out, expected, pool, expected_pool


def check(out, expected, pool, expected_pool, dtype) -> None:
    assert_close(out, expected, dtype, scale=10)
    # bf16/fp16 chunks multiply on tensor cores: the final state carries the input dtype's rounding.
    assert_close(pool, expected_pool, torch.float32 if dtype == torch.float32 else dtype, scale=10)


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("lens,none_at", SERVING_BATCHES)
@pytest.mark.parametrize("init", ["on", "off", "mixed"])
def test_serving_batches_match_reference(kernels, dtype, lens, none_at, init):
    flags = {"on": torch.ones(len(lens), dtype=torch.bool), "off": torch.zeros(len(lens), dtype=torch.bool),
             "mixed": torch.arange(len(lens)) % 3 != 1}[init]
    check(*run_both(kernels, lens, HEADS_08B, dtype, none_at, flags.cuda()), dtype)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("lens", [
    pytest.param([4, 5, 1, 0, 129, 2, 777, 3, 65], id="around-the-short-bound"),
    pytest.param([3, 1, 1, 0], id="all-short"),
    pytest.param([4], id="one-short"),
    pytest.param([5], id="one-just-long"),
    pytest.param([1, 1, 70, 1, 130, 1], id="long-between-decodes"),
])
@pytest.mark.parametrize("heads", [pytest.param((2, 4, 16, 40), id="gqa-dv40"),
                                   pytest.param((2, 2, 128, 128), id="0.8b-heads")])
def test_short_and_long_sequences_match_reference(kernels, dtype, lens, heads):
    """Sequences of <= 4 tokens take the sequential kernel, the rest the chunked ones, in one call."""
    has_init = (torch.arange(len(lens)) % 2 == 0).cuda()
    none_at = 2 if len(lens) > 2 else None
    check(*run_both(kernels, lens, heads, dtype, none_at, has_init), dtype)


@GPU
def test_mixed_step_without_initial_state_flags(kernels):
    """has_initial_state None: every sequence with a slot continues it (the engine's decode rows)."""
    lens = [1047, 1, 1, 300, 1]
    check(*run_both(kernels, lens, HEADS_08B, torch.bfloat16, None, None), torch.bfloat16)
