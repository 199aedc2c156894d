"""Typed errors users can cause, and their OpenAI error envelope.

Every error a request can trigger is an `APIError` subclass carrying its HTTP
status, OpenAI `type` and `code`, and the offending `param`. They cross Ray
actor boundaries (router -> ingress) intact: `__reduce__` keeps the fields, and
Ray re-raises a remote exception as an instance of its cause class.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """Base: an error answered with the OpenAI envelope and `status`."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code))

    def body(self) -> dict[str, Any]:
        """The OpenAI error envelope."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(cls: type[APIError], message: str, param: str | None, code: str | None) -> APIError:
    return cls(message, param=param, code=code)


class InvalidRequestError(APIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(APIError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class RequestTimeoutError(APIError):
    status = 408
    type = "timeout_error"
    code = "request_timeout"


class PayloadTooLargeError(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(APIError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailableError(APIError):
    status = 503
    type = "service_unavailable_error"
    code = "service_unavailable"


class EncoderUnavailableError(ServiceUnavailableError):
    """A request's image embeddings are gone: the vision replica that held them died.

    The router re-encodes the images and retries the request once on this error
    (the LLM has produced no token yet); a second failure reaches the client as 503.
    """

    code = "vision_encoder_unavailable"


class InternalServerError(APIError):
    status = 500
    type = "internal_error"
    code = "internal_error"


class MediaError(InvalidRequestError):
    """An image that cannot be fetched, decoded or accepted (400)."""

    code = "invalid_image"


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def _field_path(loc: tuple[Any, ...]) -> str:
    """`('messages', 0, 'content', 'list[...]', 0, 'image_url')` -> messages.0.content.0.image_url."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(p for p in parts if "[" not in p and p not in _TYPE_TAGS)


def pydantic_error_to_api(exc: Exception) -> InvalidRequestError:
    """A pydantic ValidationError -> 400 naming the most specific offending field.

    For a union (`content: str | list[part]`) pydantic reports one error per
    member; the deepest location is the one the user meant.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return InvalidRequestError(str(exc))
    items = errors(include_url=False)
    if not items:
        return InvalidRequestError("invalid request")
    first = max(items, key=lambda e: len(e.get("loc", ())))
    loc = _field_path(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return InvalidRequestError(f"{loc}: {msg}" if loc else msg, param=loc or None)
