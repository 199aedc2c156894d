"""Host-side request state: multimodal inputs, sequences, output deltas."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling_params import SamplingParams
from engine.transport import rebuild_optional, reduce_optional

GridTHW = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class MultimodalInputs:
    """What the vision encoder produced for one request.

    Shapes: image_embeds [N_tok, H]; deepstack_embeds [L, N_tok, H] | None.
    image_grid_thw: patch grid (t, h, w) per image, in prompt order; image i
        owns the next `t*h*w / merge**2` rows.
    image_hashes: one content id per image (prefix-cache keys); when None,
        they are computed from the embedding bytes.
    """

    image_embeds: torch.Tensor
    deepstack_embeds: torch.Tensor | None
    image_grid_thw: tuple[GridTHW, ...]
    image_hashes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        grids = tuple(tuple(int(v) for v in g) for g in self.image_grid_thw)
        object.__setattr__(self, "image_grid_thw", grids)

    @property
    def num_images(self) -> int:
        return len(self.image_grid_thw)

    def tokens_per_image(self, spatial_merge_size: int) -> list[int]:
        return [t * h * w // spatial_merge_size**2 for t, h, w in self.image_grid_thw]

    def __reduce__(self):
        # NumPy buffers: TP workers map the embeddings out of the object store (engine/transport.py).
        return _rebuild_multimodal_inputs, (*reduce_optional(self.image_embeds),
                                            *reduce_optional(self.deepstack_embeds),
                                            self.image_grid_thw, self.image_hashes)

    def content_hashes(self, spatial_merge_size: int) -> tuple[str, ...]:
        """Per-image ids: the given ones, else a digest of each image's embedding rows and grid."""
        if self.image_hashes is not None:
            return tuple(self.image_hashes)
        out, row = [], 0
        embeds = self.image_embeds.detach().cpu().contiguous()
        for grid, count in zip(self.image_grid_thw, self.tokens_per_image(spatial_merge_size)):
            digest = hashlib.blake2b(digest_size=16)
            digest.update(repr(grid).encode())
            digest.update(embeds[row : row + count].view(torch.uint8).numpy().tobytes())
            out.append(digest.hexdigest())
            row += count
        return tuple(out)


def _rebuild_multimodal_inputs(embeds: Any, embeds_dtype: str, deepstack: Any, deepstack_dtype: str | None,
                               grids: tuple[GridTHW, ...], hashes: tuple[str, ...] | None) -> MultimodalInputs:
    return MultimodalInputs(rebuild_optional(embeds, embeds_dtype), rebuild_optional(deepstack, deepstack_dtype),
                            grids, hashes)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities of one generated token (raw model distribution).

    `top_ids`/`top_logprobs`: the k most likely tokens, most likely first.
    """

    token_id: int
    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One streamed delta of a request.

    finish_reason: None while running, then "stop" | "length" | "abort" | "error".
    error: the message when finish_reason is "error".
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """Mutable scheduler state of one request (one completion).

    `num_computed_tokens` tokens have their KV in `block_table`; the step that
    brings it to `num_tokens` samples the next token.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    mm_inputs: MultimodalInputs | None = None
    # (start, end, content id) of each image's tokens; keys prefix-cache blocks.
    image_spans: tuple[tuple[int, int, str], ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    state_slot: int | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def remaining_prefill(self) -> int:
        """Tokens still to run before the next sample (1 for a decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
