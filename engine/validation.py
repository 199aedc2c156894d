"""Request validation before anything is queued: the one place a request's limits are checked."""

from __future__ import annotations

import dataclasses
import operator

import torch

from engine.errors import ContextLengthError, EngineInputError
from engine.positions import image_spans, mrope_positions, text_positions
from engine.sampling_params import SamplingParams
from engine.sequence import MultimodalInputs
from models.config import ModelConfig


@dataclasses.dataclass(frozen=True, slots=True)
class CheckedRequest:
    """What validation derived. Shapes: positions [3, P] int64."""

    prompt_token_ids: list[int]
    positions: torch.Tensor
    mrope_delta: int
    max_tokens: int
    image_spans: tuple[tuple[int, int, str], ...]


def _check_tokens(config: ModelConfig, max_model_len: int, kv_tokens: int, ids: list[int]) -> None:
    if not ids:
        raise EngineInputError("the prompt is empty", param="prompt")
    vocab = config.text.vocab_size
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
        raise EngineInputError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
    if len(ids) >= max_model_len:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} tokens "
            "(prompt + at least one generated token)", param="prompt")
    if len(ids) + 1 > kv_tokens:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens but the KV cache holds {kv_tokens}", param="prompt")


def _check_images(config: ModelConfig, ids: list[int], mm: MultimodalInputs | None) -> None:
    has_image_tokens = any(t in ids for t in config.placeholder_token_ids)
    if mm is None:
        if has_image_tokens:
            raise EngineInputError("the prompt has image or video placeholder tokens but no image or video inputs",
                                   param="images")
        return
    if config.vision is None:
        raise EngineInputError(f"{config.architecture} does not accept images", param="images")
    hidden = config.text.hidden_size
    merge = config.vision.spatial_merge_size
    tokens = sum(mm.tokens_per_image(merge))
    embeds = mm.image_embeds
    if embeds.dim() != 2 or embeds.shape != (tokens, hidden):
        raise EngineInputError(
            f"image_embeds must be [{tokens}, {hidden}] for grids {list(mm.image_grid_thw)}, "
            f"got {list(embeds.shape)}", param="images")
    levels = len(config.vision.deepstack_visual_indexes)
    deep = mm.deepstack_embeds
    if levels and (deep is None or tuple(deep.shape) != (levels, tokens, hidden)):
        got = None if deep is None else list(deep.shape)
        raise EngineInputError(f"deepstack_embeds must be [{levels}, {tokens}, {hidden}], got {got}", param="images")
    if not levels and deep is not None and deep.numel():
        raise EngineInputError("this model takes no deepstack embeddings", param="images")
    if mm.image_hashes is not None and len(mm.image_hashes) != mm.num_images:
        raise EngineInputError("one image hash per image is required", param="images")


def validate_request(
    config: ModelConfig,
    max_model_len: int,
    kv_tokens: int,
    prompt_token_ids: list[int],
    mm: MultimodalInputs | None,
    sampling: SamplingParams,
    hash_images: bool = True,
) -> CheckedRequest:
    """Check a request against the model and limits; derive its positions and budgets.

    `hash_images`: key each image span by its content (the given `image_hashes`, else a digest
    of its embeddings, which reads them back to the host); off (keys "") where nothing reads
    the keys: prefix caching off, or a caller that keeps only the checked ids.

    Raises:
        ContextLengthError: the prompt, or prompt + max_tokens, does not fit the context or KV cache.
        EngineInputError: any other problem, named.
    """
    if not isinstance(sampling, SamplingParams):
        raise EngineInputError("sampling must be a SamplingParams", param="sampling")
    sampling.validate()
    if sampling.n != 1:
        raise EngineInputError("the engine runs one completion per request; fan out n > 1", param="n")
    try:
        ids = [operator.index(t) for t in prompt_token_ids]
    except TypeError as exc:
        raise EngineInputError(f"prompt token ids must be integers ({exc})", param="prompt") from None
    _check_tokens(config, max_model_len, kv_tokens, ids)
    _check_images(config, ids, mm)
    limit = min(max_model_len, kv_tokens) - len(ids)
    max_tokens = limit if sampling.max_tokens is None else sampling.max_tokens
    if max_tokens > limit:
        raise ContextLengthError(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the {min(max_model_len, kv_tokens)}"
            "-token limit of this model/KV cache", param="max_tokens")
    if mm is None:
        return CheckedRequest(ids, text_positions(0, len(ids)).contiguous(), 0, max_tokens, ())
    merge = config.vision.spatial_merge_size
    positions, delta = mrope_positions(ids, mm.image_grid_thw, merge, config.placeholder_token_ids)
    counts = mm.tokens_per_image(merge)
    digests = mm.content_hashes(merge) if hash_images else ("",) * len(counts)
    spans = [(*span, digest) for span, digest in zip(
        image_spans(ids, config.placeholder_token_ids, counts), digests, strict=True)]
    return CheckedRequest(ids, positions, delta, max_tokens, tuple(spans))
