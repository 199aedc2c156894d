"""The runner's view of one sequence (`engine.runner.ModelRunner` keeps one per running sequence)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sequence import MultimodalInputs
from engine.step import NewSequence


@dataclass(slots=True)
class SeqState:
    """A sequence as one runner knows it. Shapes: positions [3, P]; image_rows [P + 1]."""

    token_ids: list[int]
    num_prompt: int
    positions: torch.Tensor
    mrope_delta: int
    new: NewSequence
    generator: torch.Generator
    mm: MultimodalInputs | None = None
    image_rows: torch.Tensor | None = None  # image tokens before each prompt index
    block_table: list[int] = field(default_factory=list)
    row: int = -1  # this sequence's row in `DecodeInputs`
    plain_greedy: bool = False  # greedy, no penalties, no logprobs: argmax is the whole sampler
    # (launch number, row of that launch's sampled ids): a token sampled on the device that the
    # host has not read yet (`ModelRunner.launch`); the next decode step reads it there.
    pending: tuple[int, int] | None = None
