"""Batched next-token sampling on the device.

Order per row (vLLM v1): penalties -> greedy argmax (temperature 0) or
temperature -> min-p -> top-k -> top-p -> draw. Each row draws with its own
`torch.Generator` (exponential race: argmax(p / q), q ~ Exp(1)), so a seeded
request gives the same tokens whatever else is in the batch. Logprobs are the
raw model log-probabilities (log_softmax of the logits before penalties and
temperature), vLLM's default, for the sampled token and the top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprobs


@dataclass(frozen=True, slots=True)
class SampleRow:
    """One row of logits to sample: its settings, history and generator."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _token_counts(lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Shapes: -> [len(lists), vocab] float32 occurrence counts."""
    width = max((len(x) for x in lists), default=0)
    counts = torch.zeros(len(lists), vocab + 1, dtype=torch.float32, device=device)
    if width:
        padded = torch.full((len(lists), width), vocab, dtype=torch.int64)
        for i, ids in enumerate(lists):
            padded[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64).clamp_(0, vocab)
        counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output) penalties.

    Shapes: logits [N, V] fp32 -> a new [N, V] when any row has penalties, else `logits`.
    """
    idx = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not idx:
        return logits
    vocab, device = logits.shape[1], logits.device
    sub = logits[idx]
    out_counts = _token_counts([rows[i].output_token_ids for i in idx], vocab, device)
    prompt_seen = _token_counts([rows[i].prompt_token_ids for i in idx], vocab, device) > 0
    params = [rows[i].params for i in idx]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
    seen = prompt_seen | (out_counts > 0)
    penalized = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalized, sub)
    sub = sub - freq * out_counts - pres * (out_counts > 0).float()
    return logits.index_put((torch.tensor(idx, device=device),), sub)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p. Shapes: logits [M, V] -> [M, V] (masked = -inf)."""
    device, vocab = logits.device, logits.shape[1]
    temp = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temp
    min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        cutoff = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < cutoff, float("-inf"))
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    if min(top_k) < vocab or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device).unsqueeze(0)
        drop = rank >= torch.tensor(top_k, device=device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop = (before > top_p) & (rank > 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Exponential race per row with the row's own generator. Shapes: probs [M, V] -> [M]."""
    q = torch.empty_like(probs)
    for i, gen in enumerate(generators):
        q[i].exponential_(generator=gen)
    return (probs / q).argmax(dim=-1)


def _logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, rows: list[SampleRow]
) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(rows)
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return out
    k = max(rows[i].params.logprobs for i in want)
    chosen = raw[want].gather(1, tokens[want].unsqueeze(1)).squeeze(1).tolist()
    top_vals, top_ids = (raw[want].topk(k, dim=-1) if k else (None, None))
    for j, i in enumerate(want):
        n = rows[i].params.logprobs
        out[i] = TokenLogprobs(
            token_id=int(tokens[i]),
            logprob=float(chosen[j]),
            top_ids=tuple(top_ids[j, :n].tolist()) if n else (),
            top_logprobs=tuple(top_vals[j, :n].tolist()) if n else (),
        )
    return out


def sample_greedy(logits: torch.Tensor, argmax: torch.Tensor | None = None) -> list[int]:
    """The whole of `sample` when every row is greedy without penalties or logprobs:
    one argmax on the device (`argmax`, when the caller has it already: a decode
    graph computes it) and one copy of N ints to the host.

    The logits may be in the model's dtype: widening to fp32 is exact, so the
    argmax (first maximum on ties, as `torch.argmax`) is the same index as over
    an fp32 copy, without writing that copy.
    Shapes: logits [N, V] (any float dtype); argmax [N] -> N token ids.
    """
    return (logits.argmax(dim=-1) if argmax is None else argmax).tolist()


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
    """Pick one token per row.

    Shapes: logits [N, V] (full vocab; any float dtype, sampled in fp32), one `SampleRow` per row.
    """
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sample rows")
    logits = logits.float()
    raw = logits.log_softmax(-1) if any(r.params.logprobs is not None for r in rows) else None
    logits = apply_penalties(logits, rows)
    tokens = logits.argmax(dim=-1)
    rand = [i for i, r in enumerate(rows) if not r.params.greedy]
    if rand:
        params = [rows[i].params for i in rand]
        probs = _filter(logits[rand], params).softmax(-1)
        tokens[rand] = _draw(probs, [rows[i].generator for i in rand])
    logprobs = _logprobs(raw, tokens, rows) if raw is not None else [None] * len(rows)
    return SamplerOutput(tokens.tolist(), logprobs)
