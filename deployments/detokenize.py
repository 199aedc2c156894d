"""Incremental detokenization and stop strings for one choice of a request.

`IncrementalDetokenizer` decodes only a short window of recent tokens per step
(vLLM's prefix/read offsets), holds text back while it ends in an incomplete
UTF-8 sequence, and never emits a prefix of a stop string: with stop strings,
the last `max(len(stop)) - 1` characters wait until they cannot start a match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Delta:
    """What one step adds: `text` to send; `stopped` when a stop string matched."""

    text: str
    stopped: bool = False


def window_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`ids -> text` as `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`.

    For a `tokenizers`-backed tokenizer that decode is exactly its Rust backend's `decode`
    (transformers' `TokenizersBackend._decode`); calling the backend directly skips ~2 us of
    Python argument conversion per call, and the detokenizer makes two calls per token of
    every stream on the ingress' event loop.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if _is_tokenizers_backend(tokenizer) and hasattr(backend, "decode"):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _is_tokenizers_backend(tokenizer: Any) -> bool:
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the generic path
        return False
    # Only where `_decode` is transformers' own (a subclass may post-process the text).
    return isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode


class IncrementalDetokenizer:
    """Token ids in, text deltas out (special tokens skipped)."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None, prompt_tail: list[int] | None = None):
        self._decode = window_decoder(tokenizer)
        self._stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        # Seeding with the prompt tail makes the first token decode as it would
        # in context (leading-space handling of byte-level BPE).
        self._ids: list[int] = list(prompt_tail or [])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""  # all generated text decoded so far
        self._emitted = 0  # characters of _text already returned
        self.num_tokens = 0

    @property
    def text(self) -> str:
        return self._text[: self._emitted]

    def _append_text(self) -> None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def add(self, token_ids: list[int], final: bool = False) -> Delta:
        """Add new tokens; `final` flushes held-back text (the sequence ended)."""
        for token in token_ids:
            self._ids.append(int(token))
            self.num_tokens += 1
            self._append_text()
            hit = self._find_stop()
            if hit is not None:
                self._text = self._text[:hit]
                return Delta(self._flush(), stopped=True)
        if final:
            return Delta(self._flush())
        ready = max(self._emitted, len(self._text) - self._hold)
        out = self._text[self._emitted : ready]
        self._emitted = ready
        return Delta(out)

    def _find_stop(self) -> int | None:
        if not self._stop:
            return None
        # Only the tail can hold a new match: search from where one could start.
        start = max(0, self._emitted - self._hold)
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _flush(self) -> str:
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out
