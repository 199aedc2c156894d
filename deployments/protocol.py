"""OpenAI request/response schema (the subset splitvl serves), as pydantic models.

Requests validate what does not depend on the deployment (types, ranges);
deployment limits (max_tokens_limit, max_n, max images...) are checked by the
router. The response builders at the end are the one place router events and
logprobs take OpenAI's shapes. Unknown top-level fields are ignored, as OpenAI-compatible servers do,
but malformed known fields (an `image_url` string instead of an object, an
unknown role) are 400s.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from deployments.messages import ChoiceDelta, TextLogprob, Usage


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate


def loads_request(data: bytes | str) -> Any:
    """A request body's JSON (HTTP and batch lines alike); ValueError with the reason when it is not one.

    Refused beyond json's own errors: nesting deeper than the parser's recursion limit, and
    strings holding a lone UTF-16 surrogate (`"\\ud800"`): valid JSON, but no text a tokenizer
    or a UTF-8 response can carry.
    """
    try:
        obj = json.loads(data)
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):  # the scan: ~3 GB/s, in C
        raise ValueError("malformed JSON: a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)")
    return obj


def _has_lone_surrogate(obj: Any) -> bool:
    """Whether a string in `obj` does not encode as UTF-8; ASCII strings (base64 images) cost O(1)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item.isascii():
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class _Lenient(BaseModel):
    """Unknown fields are ignored, except those in `UNSUPPORTED`.

    `UNSUPPORTED` maps fields other OpenAI-compatible servers implement and this
    one does not to the values that ask for nothing (the default behaviour).
    Anything else is a 400 naming the field: ignoring it would answer a different
    request than the one sent.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        refused = [
            InitErrorDetails(type=PydanticCustomError("value_error", f"`{name}` is not supported by this server"),
                             loc=(name,), input=data[name])
            for name, noops in cls.UNSUPPORTED.items()
            if data.get(name) is not None and not any(data[name] == noop for noop in noops)
        ]
        if refused:
            raise ValidationError.from_exception_data(cls.__name__, refused)
        return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str = Field(min_length=1)


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


def _video_part_forms(part: Any) -> Any:
    """vLLM's video forms: `{"video_url": "<url>"}` (no type) and `video_url` as a plain string."""
    if isinstance(part, dict) and "video_url" in part and part.get("type", "video_url") == "video_url":
        ref = part["video_url"]
        return {**part, "type": "video_url", "video_url": {"url": ref} if isinstance(ref, str) else ref}
    return part


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    UNSUPPORTED = {"tool_calls": ([],)}

    @field_validator("content", mode="before")
    @classmethod
    def _video_forms(cls, value: Any) -> Any:
        return [_video_part_forms(p) for p in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def image_urls(self) -> list[str]:
        if isinstance(self.content, list):
            return [p.image_url.url for p in self.content if isinstance(p, ImagePart)]
        return []

    def media(self) -> list[tuple[str, str]]:
        """(kind "image" | "video", url) of every media part, in order."""
        if not isinstance(self.content, list):
            return []
        return [("image", p.image_url.url) if isinstance(p, ImagePart) else ("video", p.video_url.url)
                for p in self.content if isinstance(p, (ImagePart, VideoPart))]


class StreamOptions(_Lenient):
    include_usage: bool = False
    UNSUPPORTED = {"continuous_usage_stats": (False,)}  # vLLM's usage in every chunk


class SamplingFields(_Lenient):
    """Sampling fields shared by chat and completions (OpenAI + vLLM extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    UNSUPPORTED = {
        "logit_bias": ({},), "response_format": ({"type": "text"},), "guided_json": (), "guided_regex": (),
        "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
        # vLLM's sampling extensions that would change the answer: refused, not dropped
        "min_tokens": (0,), "bad_words": ([],), "allowed_token_ids": (), "prompt_logprobs": (),
        "truncate_prompt_tokens": (), "use_beam_search": (False,), "length_penalty": (1, 1.0),
        "include_stop_str_in_output": (False,), "skip_special_tokens": (True,), "logits_processors": (),
    }

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_choices(self) -> int:
        """Choices in the response: n (per prompt, for a batched completions request)."""
        return self.n


# apply_chat_template's own arguments: a request must not set them through chat_template_kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "tokenize", "add_generation_prompt",
    "continue_final_message", "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding",
    "truncation", "max_length", "tokenizer_kwargs",
})


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's extension: extra variables for the chat template (e.g. {"enable_thinking": false}).
    chat_template_kwargs: dict[str, Any] | None = None
    UNSUPPORTED = {
        **SamplingFields.UNSUPPORTED, "tools": ([],), "tool_choice": ("none",), "functions": ([],),
        "function_call": ("none",), "modalities": (["text"],), "audio": (), "prediction": (),
        # vLLM's chat template switches other than chat_template_kwargs: the prompt is always the
        # template's with the generation prompt added
        "add_generation_prompt": (True,), "continue_final_message": (False,), "chat_template": (), "echo": (False,),
    }

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in value or {}:
            if not key.isidentifier() or key in RESERVED_TEMPLATE_KWARGS:
                raise ValueError(f"{key!r} cannot be set through chat_template_kwargs")
        return value

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    """`prompt` as OpenAI takes it: a string, token ids, or a list of either (batched: every prompt
    gets `n` choices, prompt i's at indices i * n to i * n + n - 1)."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    UNSUPPORTED = {**SamplingFields.UNSUPPORTED, "best_of": (1,), "suffix": ("",)}

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt_kind(cls, value: Any) -> Any:
        if isinstance(value, list) and value:
            kinds = {"text" if isinstance(p, str) else "ids" if isinstance(p, list) else "id" for p in value}
            if len(kinds) > 1:
                raise ValueError("a prompt list must hold only strings, only token ids, or only token-id lists")
            if kinds <= {"text", "ids"} and any(len(p) == 0 for p in value):
                raise ValueError("every prompt of a prompt list must be non-empty")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or each of a batched request's."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def openai_logprobs(items: Sequence[TextLogprob], chat: bool, text_offset: int = 0) -> dict[str, Any]:
    """Logprobs in OpenAI's shape: chat's `{"content": [...]}`, or the legacy completions object.

    text_offset: characters of the choice's text before these tokens (completions' `text_offset`).
    """
    if chat:
        return {"content": [
            {"token": i.token, "logprob": i.logprob, "bytes": list(i.token.encode()),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in i.top]}
            for i in items
        ]}
    offsets = []
    for item in items:
        offsets.append(text_offset)
        text_offset += len(item.token)
    return {
        "tokens": [i.token for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [dict(i.top) for i in items],
        "text_offset": offsets,
    }


def choice_dict(chat: bool, stream: bool, delta: ChoiceDelta, text_offset: int = 0) -> dict[str, Any]:
    """One choice of a response (stream False) or chunk (stream True); `delta` holds its text so far."""
    if not chat:
        body: dict[str, Any] = {"text": delta.text}
    elif stream:
        body = {"delta": {"content": delta.text}}
    else:
        body = {"message": {"role": "assistant", "content": delta.text}}
    logprobs = openai_logprobs(delta.logprobs, chat, text_offset) if delta.logprobs else None
    return {"index": delta.index, **body, "logprobs": logprobs, "finish_reason": delta.finish_reason}


def completion_object(
    chat: bool, stream: bool, rid: str, model: str, created: int,
    choices: list[dict[str, Any]], usage: Usage | None = None,
) -> dict[str, Any]:
    """A `chat.completion`, `chat.completion.chunk` or `text_completion` object."""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    out: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage_dict(usage)
    return out


def models_response(model_id: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "splitvl"}],
    }
