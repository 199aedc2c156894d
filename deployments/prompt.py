"""Request -> prompt token ids and sampling settings (pure functions, no Ray).

Chat messages are rendered with the checkpoint's chat template (image parts as
`{"type": "image"}`, which Qwen templates turn into
`<|vision_start|><|image_pad|><|vision_end|>`), tokenized, and each image's
single `<|image_pad|>` is expanded to its token count. Deployment limits that
the schema cannot know (max_tokens_limit, max_n, stop strings) are checked here;
the context length is the engine's check (`engine.validation`), which the LLM
replica answers as a 400 with code `context_length_exceeded`.
"""

from __future__ import annotations

from typing import Any

from deployments.config import LimitsConfig
from deployments.errors import InvalidRequestError
from deployments.protocol import ChatCompletionRequest, CompletionRequest, ImagePart, SamplingFields, VideoPart
from engine.errors import EngineInputError
from engine.sampling_params import SamplingParams


def template_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """OpenAI messages -> the dicts chat templates expect (images as {"type": "image"})."""
    out = []
    for msg in request.messages:
        if msg.content is None or isinstance(msg.content, str):
            content: Any = msg.content or ""
        else:
            content = [
                {"type": "image"} if isinstance(p, ImagePart) else {"type": "video"} if isinstance(p, VideoPart)
                else {"type": "text", "text": p.text}
                for p in msg.content
            ]
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": content})
    return out


def image_urls(request: ChatCompletionRequest) -> list[str]:
    return [url for msg in request.messages for url in msg.image_urls()]


def media_parts(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(kind, url) of every image and video part, in prompt order."""
    return [item for msg in request.messages for item in msg.media()]


def chat_prompt_text(tokenizer: Any, request: ChatCompletionRequest) -> str:
    """The rendered chat template (one `<|image_pad|>` per image, the template's video wrapper per video)."""
    try:
        return tokenizer.apply_chat_template(
            template_messages(request), tokenize=False, add_generation_prompt=True,
            **(request.chat_template_kwargs or {}),
        )
    except Exception as exc:  # jinja errors from a template that rejects the messages
        raise InvalidRequestError(f"the chat template cannot render these messages: {exc}", "messages") from exc


def chat_prompt_ids(tokenizer: Any, request: ChatCompletionRequest) -> list[int]:
    """Render the chat template and tokenize (one `<|image_pad|>` per image)."""
    return list(tokenizer.encode(chat_prompt_text(tokenizer, request), add_special_tokens=False))


def expand_videos(text: str, expansions: list[str]) -> str:
    """The template's video wrappers replaced by timestamped frame groups (400 if they disagree)."""
    from models.video_processor import VideoError, expand_video_wrappers

    try:
        return expand_video_wrappers(text, expansions)
    except VideoError as exc:
        raise InvalidRequestError(f"{exc}; message text must not contain video placeholder tokens", "messages") from None


def completion_prompt_ids(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """One completions prompt (`CompletionRequest.prompts`' item) as token ids."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}", "prompt")
    return list(prompt)


def expand_image_pads(ids: list[int], image_token_id: int | tuple[int, ...], counts: list[int]) -> list[int]:
    """Replace the i-th `<|image_pad|>` by `counts[i]` of them (the engine's rule).

    Raises:
        InvalidRequestError: the prompt holds a different number of image
            placeholders than images (e.g. the text spells the special token).
    """
    from engine.positions import expand_image_placeholders

    try:
        return expand_image_placeholders(ids, image_token_id, counts)
    except EngineInputError as exc:
        raise InvalidRequestError(
            f"{exc}; message text must not contain image placeholder tokens", "messages"
        ) from None


def check_limits(request: SamplingFields, limits: LimitsConfig) -> None:
    """Deployment limits on a request's sampling fields (400 naming the field)."""
    max_tokens = request.requested_max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise InvalidRequestError(
            f"max_tokens {max_tokens} exceeds this deployment's limit {limits.max_tokens_limit}", "max_tokens"
        )
    if request.n > limits.max_n:
        raise InvalidRequestError(f"n {request.n} exceeds this deployment's limit {limits.max_n}", "n")
    if request.stop and len(request.stop) > limits.max_stop_strings:
        raise InvalidRequestError(
            f"{len(request.stop)} stop strings; at most {limits.max_stop_strings} are allowed", "stop"
        )


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest, prompt_len: int, max_model_len: int,
    limits: LimitsConfig, vocab_size: int, seed_offset: int = 0,
) -> SamplingParams:
    """The engine's sampling settings for one choice of `request`.

    Without max_tokens a request gets what the context leaves (the engine's default),
    at most `limits.max_tokens_limit`. `seed_offset` makes the choices of a seeded
    request differ from each other and stay reproducible.
    """
    max_tokens = request.requested_max_tokens
    if max_tokens is None and limits.max_tokens_limit < max_model_len - prompt_len:
        max_tokens = limits.max_tokens_limit
    stop_ids = tuple(request.stop_token_ids or ())
    if any(not 0 <= t < vocab_size for t in stop_ids):
        raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            seed=None if request.seed is None else request.seed + seed_offset,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            stop_token_ids=stop_ids,
            ignore_eos=request.ignore_eos,
            logprobs=request.num_logprobs,
        )
    except EngineInputError as exc:
        raise InvalidRequestError(str(exc), exc.param, code=exc.code) from None
