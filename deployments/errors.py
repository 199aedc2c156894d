"""Typed errors users can cause, their OpenAI error envelope, and the one classifier of failures.

Every error a request can trigger is an `APIError` subclass carrying its HTTP
status, OpenAI `type` and `code`, and the offending `param`. They cross Ray
actor boundaries (LLM replica -> router, ingress -> batch job) intact: `__reduce__`
keeps the fields, and Ray re-raises a remote exception as an instance of its cause
class. `as_api_error` maps anything else (Ray's errors around remote calls included).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class APIError(Exception):
    """Base: an error answered with the OpenAI envelope and `status`."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init_subclass__(cls, status: int | None = None, type: str | None = None,  # noqa: A002 (OpenAI's name)
                          code: str | None = None, **kwargs: Any):
        """`class X(APIError, status=.., type=.., code=..)`: a keyword left out is inherited."""
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if type is not None:
            cls.type = type
        if code is not None:
            cls.code = code

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


class InvalidRequestError(APIError, status=400, type="invalid_request_error"):
    """A request the OpenAI schema or the model's limits reject (400)."""


class AuthenticationError(APIError, status=401, type="authentication_error", code="invalid_api_key"):
    """A missing or wrong API key (401)."""


class NotFoundError(APIError, status=404, type="not_found_error", code="model_not_found"):
    """A model (or route) this application does not serve (404)."""


class RequestTimeoutError(APIError, status=408, type="timeout_error", code="request_timeout"):
    """A request that ran past the deployment's request_timeout_s (408)."""


class PayloadTooLargeError(APIError, status=413, type="invalid_request_error", code="request_too_large"):
    """A request body over the ingress's size limit (413)."""


class ServiceUnavailableError(APIError, status=503, type="service_unavailable_error", code="service_unavailable"):
    """Overload or a dead replica: the client may retry (503)."""


class EncoderUnavailableError(ServiceUnavailableError, code="vision_encoder_unavailable"):
    """A request's image embeddings are gone: the vision replica that held them died.

    The router re-encodes the images and retries the request once on this error
    (the LLM has produced no token yet); a second failure reaches the client as 503.
    """


class InternalServerError(APIError, status=500, type="internal_error", code="internal_error"):
    """A failure on our side, answered without a traceback (500)."""


class MediaError(InvalidRequestError, code="invalid_image"):
    """An image that cannot be fetched, decoded or accepted (400)."""


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


# Ray/Serve exception class names meaning a replica (or an object it owned) is gone.
_REPLICA_DEATH = ("ActorDied", "ActorUnavailable", "ActorError", "DeploymentUnavailable",
                  "ObjectLost", "OwnerDied", "ObjectReconstruction")


def is_replica_death(exc: BaseException) -> bool:
    """Whether `exc` says the replica (or the object it computed) is gone, not that the call failed."""
    name = type(exc).__name__
    return any(k in name for k in _REPLICA_DEATH)


def as_api_error(exc: BaseException) -> APIError:
    """Any failure on the request path (ours, or Ray's around a remote call) -> the APIError to answer with.

    Ray re-raises a remote APIError wrapped, with the original as `cause`.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, APIError):
        return cause
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TimeoutError):
        return RequestTimeoutError("the request took longer than the deployment's request_timeout_s")
    name = type(exc).__name__
    if "BackPressure" in name:
        return ServiceUnavailableError("the server is overloaded; retry later", code="overloaded")
    if is_replica_death(exc):
        return ServiceUnavailableError(f"a model replica is unavailable ({name}); retry the request")
    logger.error("request failed: %s: %s", name, exc, exc_info=exc)
    return InternalServerError(f"internal error ({name})")
