"""bench/timeline.py's summary: a step's ms is its own wall time, overlapped (async) records or not."""

from __future__ import annotations

import pytest

from bench.timeline import own_times_s, summarize
from engine.timeline import EncodeRecord, StepRecord, ThreadUsage


def _rec(start: float, end: float, decode: int = 4, prefill: int = 0, idle: float = 0.0) -> StepRecord:
    return StepRecord(start, end, idle, 0.0, 1e-4, 1e-4, (end - start) / 2, 1e-4, decode, prefill,
                      100 * prefill, decode + prefill, 0)


def test_async_records_count_each_step_once() -> None:
    # Async scheduling: each record spans its launch to its outputs, past the next launch.
    # The loop delivers a step every 2 ms; each record lasts 3.5 ms.
    steps = [_rec(0.0 + 0.002 * i, 0.0035 + 0.002 * i) for i in range(10)]
    own = own_times_s(steps)
    assert own[0] == pytest.approx(0.0035) and own[1:] == pytest.approx([0.002] * 9)
    s = summarize(steps, [])
    span = steps[-1].end - steps[0].start
    assert s["phases_ms"]["step"]["p50"] == pytest.approx(2.0)
    assert s["decode_step_ms"] == pytest.approx(1e3 * span / len(steps))
    assert s["steps_per_s"] * s["decode_step_ms"] / 1e3 == pytest.approx(1.0)  # busy the whole window
    assert s["busy_frac"] == pytest.approx(1.0) and s["idle_frac"] == 0


def test_sync_records_keep_their_duration_and_gaps_are_idle() -> None:
    steps = [_rec(0.0, 0.004, prefill=1), _rec(0.004, 0.006), _rec(0.010, 0.012, idle=0.004)]
    assert own_times_s(steps) == pytest.approx([0.004, 0.002, 0.002])
    s = summarize(steps, [EncodeRecord(0.0105, 0.0107, 1, 64)])
    assert s["mixed_step_ms"] == pytest.approx(4.0) and s["decode_step_ms"] == pytest.approx(2.0)
    assert s["decode_step_ms_with_encode"] == pytest.approx(2.0) and s["decode_steps"] == 2
    assert s["busy_frac"] == pytest.approx(8 / 12) and s["idle_frac"] == pytest.approx(4 / 12)


def test_idle_gaps_are_counted_and_the_longest_reported() -> None:
    steps = [_rec(0.0, 0.002), _rec(0.003, 0.005, idle=0.001), _rec(0.015, 0.017, idle=0.010),
             _rec(0.047, 0.049, idle=0.030)]
    s = summarize(steps, [])
    assert s["idle_gaps"] == 2 and s["idle_gap_max_ms"] == pytest.approx(30.0)


def test_thread_usage_is_split_by_kind_of_step() -> None:
    """A mixed step that waited (wall >> CPU, many voluntary switches) is told from decode steps that computed."""
    mixed = StepRecord(0.0, 0.020, 0.0, 0.0, 1e-4, 1e-4, 0.019, 1e-4, 8, 1, 100, 9, 0, ThreadUsage(0.004, 40, 1))
    decodes = [StepRecord(0.020 + 0.002 * i, 0.022 + 0.002 * i, 0.0, 0.0, 1e-4, 1e-4, 0.0018, 1e-4, 9, 0, 0, 9, 0,
                          ThreadUsage(0.0019, 1, 0)) for i in range(4)]
    usage = summarize([mixed, *decodes], [])["thread_usage"]
    assert usage["mixed"] == pytest.approx({"steps": 1, "wall_ms": 20.0, "cpu_ms": 4.0, "voluntary_switches": 40,
                                            "involuntary_switches": 1})
    assert usage["decode"] == pytest.approx({"steps": 4, "wall_ms": 2.0, "cpu_ms": 1.9, "voluntary_switches": 1,
                                             "involuntary_switches": 0})
    assert usage["prefill"]["steps"] == 0


def test_mixed_steps_launched_early_are_those_overlapping_the_step_ahead() -> None:
    steps = [_rec(0.0, 0.004, prefill=1), _rec(0.003, 0.007, prefill=1), _rec(0.007, 0.009, prefill=1),
             _rec(0.0085, 0.0110), _rec(0.0105, 0.0130, prefill=1)]
    s = summarize(steps, [])
    assert s["mixed_steps"] == 4 and s["mixed_early"] == 2  # the second and the last
