"""The per-step message from the engine to every runner (TP rank), and the reply.

Sequences' state is cached on the runners: a sequence's prompt, images and
sampling settings travel once (`NewSequence`); each step then carries only the
tokens sampled since the last step and the blocks appended to its table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import MultimodalInputs, TokenLogprobs


@dataclass(frozen=True, slots=True)
class NewSequence:
    """Shapes: positions [3, P] int64 (mRoPE of the prompt)."""

    seq_id: int
    prompt_token_ids: tuple[int, ...]
    positions: torch.Tensor
    mrope_delta: int
    sampling: SamplingParams
    generator_seed: int
    mm: MultimodalInputs | None


@dataclass(frozen=True, slots=True)
class SeqStep:
    """One sequence's work this step: compute tokens [start, start + num_new_tokens)."""

    seq_id: int
    start: int
    num_new_tokens: int
    appended_token_ids: tuple[int, ...]  # generated since the runner last heard
    block_ids: tuple[int, ...]  # appended to the table, or the whole table if reset
    reset_blocks: bool
    sample: bool
    state_slot: int | None = None


@dataclass(frozen=True, slots=True)
class StepMessage:
    new_seqs: tuple[NewSequence, ...]
    steps: tuple[SeqStep, ...]
    freed_seq_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepResult:
    """Sampled tokens of the sequences with `sample` set, in step order (rank 0 only)."""

    seq_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs | None, ...]
