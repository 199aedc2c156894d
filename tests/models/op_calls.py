"""Counting the calls of `ops.<name>` in a test (monkeypatched, so the model's layers see the counter)."""

from __future__ import annotations

import ops


def count_op_calls(monkeypatch, *names: str) -> list[int]:
    """One counter per name, in order, of the calls of `ops.<name>` from now until the test ends."""
    calls = [0] * len(names)
    for i, name in enumerate(names):
        real = getattr(ops, name)

        def counted(*args, _i=i, _real=real):
            calls[_i] += 1
            return _real(*args)

        monkeypatch.setattr(ops, name, counted)
    return calls
