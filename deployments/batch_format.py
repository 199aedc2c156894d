"""Batch job lines: the OpenAI Batch file format and the simple format, in and out.

OpenAI Batch (as the `openai` client's batch files and vLLM's `run_batch`):
    in:  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
    out: {"id": "batch_req_...", "custom_id",
          "response": {"status_code", "request_id", "body": <what the HTTP endpoint answers>},
          "error": null | {"message", "type", "param", "code"[, "line"]}}
A request the server refuses (invalid body, unknown model, timeout) keeps its
HTTP status and error envelope in `response` and repeats the error object in
`error`; a line that is no request at all (bad JSON, unknown url or method, no
custom_id) gets `"response": null` and an `error` with the line number (as
OpenAI's `BatchError.line`).

Simple (one chat completion per line):
    in:  {"id", "messages", ...sampling fields}
    out: {"id", "text", "finish_reason", "usage"} | {"id", "error": {...}}

The format is detected per line: a line with an OpenAI key (`custom_id`,
`method`, `url`, `body`) or without an `id` is an OpenAI line.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from deployments.errors import APIError, InvalidRequestError
from deployments.protocol import loads_request

URLS = {"/v1/chat/completions": True, "/v1/completions": False}  # url -> is chat
_OPENAI_KEYS = ("custom_id", "method", "url", "body")

Format = Literal["openai", "simple"]


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One input line, parsed; `error` set when it cannot be run as a request."""

    lineno: int
    format: Format
    key: str  # resume key: custom_id (openai), id (simple), "line:<n>" when neither
    custom_id: str | None = None
    chat: bool = True
    body: dict[str, Any] | None = None
    error: APIError | None = None


def line_key(lineno: int) -> str:
    """Resume key of a line without a usable custom_id."""
    return f"line:{lineno}"


def jsonl_lines(data: bytes) -> list[bytes]:
    """A JSONL file's lines: split at "\\n" only, a trailing "\\r" and a leading UTF-8 BOM dropped.

    Not `str.splitlines`: it also splits at U+2028, U+0085 and other separators that JSON
    strings may hold unescaped (a model's answer written with `ensure_ascii=False`).
    """
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line.removesuffix(b"\r") for line in lines]


def parse_line(text: str | bytes, lineno: int) -> BatchLine:
    """Parse input line `lineno` (1-based; bytes: UTF-8); never raises: a broken line carries its error."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _broken(lineno, None, f"the line is not UTF-8 ({exc.reason} at byte {exc.start})", None,
                           "invalid_json")
    try:
        obj = loads_request(text)
    except ValueError as exc:
        return _broken(lineno, None, str(exc), None, "invalid_json")
    if not isinstance(obj, dict):
        return _broken(lineno, None, "a line must be a JSON object", None, "invalid_json")
    if "id" in obj and not any(k in obj for k in _OPENAI_KEYS):
        return _simple_line(obj, lineno)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _broken(lineno, None, "custom_id must be a non-empty string", "custom_id", "missing_required_parameter")
    if obj.get("method", "POST") != "POST":
        return _broken(lineno, custom_id, f"method {obj.get('method')!r} is not supported; use POST", "method")
    url = obj.get("url")
    if url not in URLS:
        return _broken(lineno, custom_id, f"url {url!r} is not supported; use one of {sorted(URLS)}", "url",
                       "unsupported_url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return _broken(lineno, custom_id, "body must be a JSON object (the request body)", "body")
    return BatchLine(lineno, "openai", custom_id, custom_id, URLS[url], body)


def _simple_line(obj: dict[str, Any], lineno: int) -> BatchLine:
    rid = str(obj["id"])
    body = {k: v for k, v in obj.items() if k != "id"}
    error = None
    if body.get("n", 1) != 1:
        error = InvalidRequestError("batch requests take n = 1", "n")
    return BatchLine(lineno, "simple", rid, body=body, error=error)


def _broken(lineno: int, custom_id: str | None, message: str, param: str | None,
            code: str = "invalid_batch_line") -> BatchLine:
    error = InvalidRequestError(f"line {lineno}: {message}", param, code=code)
    return BatchLine(lineno, "openai", custom_id or line_key(lineno), custom_id, error=error)


def output_record(line: BatchLine, status: int | None, body: dict[str, Any] | None) -> dict[str, Any]:
    """The output line for `line`, answered with (HTTP status, JSON body), or (None, None)
    when the line never became a request (then `line.error` says why)."""
    if line.format == "simple":
        return _simple_record(line, status, body)
    error: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    if status is None:
        assert line.error is not None
        error = {**line.error.body()["error"], "line": line.lineno}
    else:
        request_id = body.get("id") if status == 200 else None
        response = {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}", "body": body}
        error = None if status == 200 else body["error"]
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": response,
            "error": error}


def _simple_record(line: BatchLine, status: int | None, body: dict[str, Any] | None) -> dict[str, Any]:
    if status is None:
        assert line.error is not None
        return {"id": line.key, "error": line.error.body()["error"]}
    if status != 200:
        return {"id": line.key, "error": body["error"]}
    choice = body["choices"][0]
    return {"id": line.key, "text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "usage": body["usage"]}


def record_key(record: dict[str, Any]) -> str:
    """The resume key of an output record (the key of the input line it answers).

    Raises:
        KeyError / TypeError for a record that is not an output line.
    """
    if "custom_id" in record:
        if record["custom_id"] is not None:
            return str(record["custom_id"])
        return line_key(int(record["error"]["line"]))
    return str(record["id"])


def record_failed(record: dict[str, Any]) -> bool:
    """Whether an output record reports a failure."""
    return record.get("error") is not None
