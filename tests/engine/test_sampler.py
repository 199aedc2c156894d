"""Sampler vs plain per-row references."""

from __future__ import annotations

import torch

from engine.sampler import SampleRow, _filter, apply_penalties, sample, sample_greedy
from engine.sampling_params import SamplingParams

V = 50


def _row(params: SamplingParams, prompt=(1, 2, 3), output=(4, 4, 5), seed: int | None = None) -> SampleRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator().manual_seed(0)
    return SampleRow(params, list(prompt), list(output), gen)


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_equal_argmax():
    logits = _logits(4)
    greedy = sample(logits, [_row(SamplingParams(temperature=0))] * 4)
    topk1 = sample(logits, [_row(SamplingParams(temperature=1.3, top_k=1), seed=i) for i in range(4)])
    assert greedy.token_ids == logits.argmax(-1).tolist() == topk1.token_ids


def test_greedy_over_model_dtype_equals_fp32_argmax():
    """bf16 / fp16 logits with many exact ties (coarse values): the argmax over them is the fp32 copy's,
    first maximum included, and what `sample` picks for greedy rows."""
    for dtype in (torch.bfloat16, torch.float16):
        logits = (torch.randint(0, 6, (64, 997), generator=torch.Generator().manual_seed(1)) * 0.5).to(dtype)
        logits[3] = 2.0  # one row of nothing but ties
        want = logits.float().argmax(-1)
        first = [int((row == row.max()).nonzero()[0]) for row in logits.float()]
        assert want.tolist() == first
        assert sample_greedy(logits) == want.tolist()
        assert sample(logits, [_row(SamplingParams(temperature=0))] * 64).token_ids == want.tolist()


def test_seeded_rows_independent_of_batch():
    logits = _logits(3)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    alone = [sample(logits[i : i + 1], [_row(params, seed=7)]).token_ids[0] for i in range(3)]
    other = SamplingParams(temperature=1.0)
    rows = [_row(params, seed=7), _row(other, seed=1), _row(params, seed=7)]
    batch = sample(torch.stack([logits[0], logits[1], logits[2]]), rows).token_ids
    assert batch[0] == alone[0] and batch[2] == alone[2]
    again = [sample(logits[i : i + 1], [_row(params, seed=7)]).token_ids[0] for i in range(3)]
    assert again == alone


def test_sampling_follows_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0] + [-30.0] * (V - 4)])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(V)
    params = SamplingParams(temperature=1.0)
    for _ in range(3000):
        tok = sample(logits, [SampleRow(params, [], [], gen)]).token_ids[0]
        counts[tok] += 1
    expected = logits[0].softmax(-1)
    assert torch.allclose(counts / 3000, expected, atol=0.03)


def _ref_penalties(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    out = logits.clone()
    p = row.params
    seen = set(row.prompt_token_ids) | set(row.output_token_ids)
    for tok in seen:
        out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
    for tok in set(row.output_token_ids):
        c = row.output_token_ids.count(tok)
        out[tok] -= p.frequency_penalty * c + p.presence_penalty
    return out


def test_penalties_match_reference():
    logits = _logits(3)
    rows = [
        _row(SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2)),
        _row(SamplingParams()),
        _row(SamplingParams(presence_penalty=-0.7), prompt=(9,), output=(1, 1, 1, 2)),
    ]
    got = apply_penalties(logits.clone(), rows)
    for i, row in enumerate(rows):
        assert torch.allclose(got[i], _ref_penalties(logits[i], row))


def _ref_filter(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    x = logits / p.temperature
    probs = x.softmax(-1)
    keep = {i for i in range(V) if probs[i] >= p.min_p * probs.max()}
    order = sorted(keep, key=lambda i: -x[i].item())
    if p.top_k > 0:
        order = order[: p.top_k]
    sub = torch.tensor([x[i].item() for i in order]).softmax(-1)
    kept, mass = [], 0.0
    for i, pr in zip(order, sub.tolist()):
        if kept and mass > p.top_p:
            break
        kept.append(i)
        mass += pr
    return set(kept)


def test_filters_match_reference():
    logits = _logits(4, seed=5)
    params = [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.2, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.8, min_p=0.02),
    ]
    out = _filter(logits.clone(), params)
    for i, p in enumerate(params):
        kept = set(torch.nonzero(torch.isfinite(out[i])).flatten().tolist())
        assert kept == _ref_filter(logits[i], p)


def test_logprobs_are_raw_log_softmax():
    logits = _logits(2)
    rows = [
        _row(SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.5), seed=1),
        _row(SamplingParams(temperature=0, logprobs=0)),
    ]
    out = sample(logits, rows)
    ref = logits.log_softmax(-1)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - ref[i, lp.token_id].item()) < 1e-6
    vals, ids = ref[0].topk(3)
    assert list(out.logprobs[0].top_ids) == ids.tolist()
    assert torch.allclose(torch.tensor(out.logprobs[0].top_logprobs), vals)
    assert out.logprobs[1].top_ids == ()
