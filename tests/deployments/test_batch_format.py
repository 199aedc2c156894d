"""Batch lines (OpenAI Batch and simple format), resume bookkeeping, and `model:` as a
Hugging Face repo id resolved offline from a hub-layout cache. No Ray here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.batch import load_done, read_inputs
from deployments.batch_format import output_record, parse_line, record_failed, record_key
from deployments.config import AppConfig, ensure_checkpoint
from deployments.model_source import ModelNotFoundError
from tests.deployments.helpers import hub_cache_from

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def openai_line(custom_id: str, url: str = "/v1/chat/completions", body: dict | None = None) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body or CHAT})


def test_openai_and_simple_lines_are_told_apart():
    chat = parse_line(openai_line("a"), 1)
    assert (chat.format, chat.key, chat.chat, chat.body, chat.error) == ("openai", "a", True, CHAT, None)
    completion = parse_line(openai_line("b", "/v1/completions", {"model": "m", "prompt": "x"}), 2)
    assert completion.chat is False and completion.error is None
    simple = parse_line(json.dumps({"id": 7, **CHAT}), 3)
    assert (simple.format, simple.key, simple.body) == ("simple", "7", CHAT)


@pytest.mark.parametrize("text, param, code", [
    ("{not json", None, "invalid_json"),
    ("[1, 2]", None, "invalid_json"),
    (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": CHAT}), "custom_id",
     "missing_required_parameter"),
    (openai_line("u", url="/v1/embeddings"), "url", "unsupported_url"),
    (json.dumps({"custom_id": "g", "method": "GET", "url": "/v1/completions", "body": {}}), "method",
     "invalid_batch_line"),
    (json.dumps({"custom_id": "s", "method": "POST", "url": "/v1/completions", "body": "x"}), "body",
     "invalid_batch_line"),
])
def test_a_broken_line_gets_a_null_response_and_an_error_with_its_line(text, param, code):
    line = parse_line(text, 5)
    record = output_record(line, None, None)
    assert record["response"] is None and record["id"].startswith("batch_req_")
    assert record["error"]["param"] == param and record["error"]["code"] == code
    assert record["error"]["type"] == "invalid_request_error" and record["error"]["line"] == 5
    assert "line 5" in record["error"]["message"]
    assert record_key(json.loads(json.dumps(record))) == line.key  # resume finds it again
    assert record_failed(record)


def test_records_carry_the_http_status_and_body():
    line = parse_line(openai_line("c"), 1)
    body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "yo"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    ok = output_record(line, 200, body)
    assert ok["response"] == {"status_code": 200, "request_id": "chatcmpl-1", "body": body}
    assert ok["error"] is None and ok["custom_id"] == "c" and not record_failed(ok)
    envelope = {"error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": None}}
    refused = output_record(line, 400, envelope)
    assert refused["response"]["status_code"] == 400 and refused["response"]["body"] == envelope
    assert refused["error"] == envelope["error"] and record_failed(refused)
    simple = parse_line(json.dumps({"id": "s1", **CHAT}), 2)
    assert output_record(simple, 200, body) == {"id": "s1", "text": "yo", "finish_reason": "length",
                                                "usage": body["usage"]}
    assert output_record(simple, 400, envelope) == {"id": "s1", "error": envelope["error"]}
    n2 = parse_line(json.dumps({"id": "s2", **CHAT, "n": 2}), 3)
    assert output_record(n2, None, None)["error"]["param"] == "n"


def test_duplicate_custom_id_stops_before_running(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(openai_line("a") + "\n\n" + openai_line("b") + "\n" + openai_line("a") + "\n")
    with pytest.raises(SystemExit, match="in.jsonl:4: duplicate id 'a' \\(first on line 1\\)"):
        read_inputs(path)


def test_load_done_drops_torn_and_duplicate_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    good = output_record(parse_line(openai_line("a"), 1), 200, {"id": "x", "choices": []})
    broken = output_record(parse_line("{oops", 2), None, None)
    simple = {"id": "s", "error": {"message": "m"}}
    lines = [json.dumps(r) for r in (good, broken, good, simple)]
    out.write_text("\n".join(lines) + '\n{"custom_id": "b", "resp')
    assert load_done(out) == {"a": False, "line:2": True, "s": True}
    assert out.read_text().splitlines() == [lines[0], lines[1], lines[3]]


def test_lines_split_at_newlines_only(tmp_path):
    """JSON strings may hold U+2028 / U+0085 raw (answers are written with ensure_ascii=False): a line is
    what lies between "\\n"s. CRLF files and a UTF-8 BOM read as plain ones; a line that is not UTF-8 is a
    broken line of its own (`invalid_json`), not the whole file's traceback."""
    text_body = {"model": "m", "prompt": "a\u2028b\u0085c", "max_tokens": 2}
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b"\xef\xbb\xbf" + openai_line("a").encode() + b"\r\n"
                       + json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": text_body},
                                    ensure_ascii=False).encode() + b"\r\n"
                       + b'{"custom_id": "c", "prompt": "\xff\xfe"}\n' + openai_line("d").encode())
    lines = read_inputs(inputs)
    assert [(line.key, line.error is None) for line in lines] == [("a", True), ("b", True), ("line:3", False),
                                                                    ("d", True)]
    assert lines[1].body == text_body
    assert lines[2].error.code == "invalid_json" and "not UTF-8" in lines[2].error.message
    out = tmp_path / "out.jsonl"
    answered = output_record(lines[1], 200, {"id": "x", "choices": [{"index": 0, "text": "\u2028\x85", "logprobs": None,
                                                                      "finish_reason": "length"}]})
    written = json.dumps(answered, ensure_ascii=False) + "\n"
    out.write_text(written)
    assert load_done(out) == {"b": False}
    assert out.read_text() == written  # kept as it was, nothing dropped as torn


# ---------------------------------------------------------------- model: org/name


@pytest.fixture
def hub(tmp_path, tiny_checkpoint, monkeypatch):
    """An offline hub cache holding org/tiny-vl (laid out as the hub writes it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    snapshot = hub_cache_from(tiny_checkpoint("qwen3_vl"), cache, "org/tiny-vl")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, snapshot


def test_repo_id_resolves_from_the_hub_cache_offline(hub):
    cache, snapshot = hub
    config = AppConfig.model_validate({"model": "org/tiny-vl"})
    assert config.from_hub and config.served_model_id == "org/tiny-vl"
    assert ensure_checkpoint(config) == snapshot
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(config.model_path)).name_or_path == str(snapshot)
    pinned = AppConfig.model_validate({"model": "org/tiny-vl", "revision": snapshot.name, "model_id": "x"})
    assert pinned.model_path == snapshot and pinned.served_model_id == "x"


def test_missing_repo_offline_names_the_id_and_the_cache(hub):
    cache, _ = hub
    config = AppConfig.model_validate({"model": "org/absent"})
    with pytest.raises(ModelNotFoundError) as info:
        ensure_checkpoint(config)
    assert "'org/absent'" in str(info.value) and str(cache) in str(info.value)
    assert "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="revision 'v9'"):
        AppConfig.model_validate({"model": "org/tiny-vl", "revision": "v9"}).model_path


def test_local_directory_and_bad_model_values(tmp_path):
    assert not AppConfig.model_validate({"model": str(tmp_path)}).from_hub
    for bad in (str(tmp_path / "missing"), "a/b/c", "just-a-name"):
        with pytest.raises(ValidationError, match="not a directory or a Hugging Face repo id"):
            AppConfig.model_validate({"model": bad})
    with pytest.raises(ValidationError, match="revision applies"):
        AppConfig.model_validate({"model": str(tmp_path), "revision": "main"})
