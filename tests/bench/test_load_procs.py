"""bench/load_procs.py: how a level is split over client processes."""

from __future__ import annotations

import pytest

from bench.load_procs import default_procs, split_level, stream_ramps


@pytest.mark.parametrize("n, c, procs", [(128, 64, 4), (10, 3, 2), (7, 5, 8), (16, 16, 3), (2, 1, 4)])
def test_split_keeps_every_request_once_and_the_concurrency(n: int, c: int, procs: int) -> None:
    bodies = [{"i": i} for i in range(n)]
    parts = split_level(bodies, c, procs)
    assert [b["i"] for part, _ in parts for b in part] == list(range(n))
    assert sum(share for _, share in parts) == c and len(parts) <= min(procs, c)
    shares = [share for _, share in parts]
    assert max(shares) - min(shares) <= 1
    for part, share in parts:  # requests in proportion to the streams, so the processes end together
        assert abs(len(part) - n * share / c) <= 1


def test_default_procs_is_one_per_16_streams_capped() -> None:
    assert [default_procs(c) for c in (1, 8, 16, 17, 32, 64, 1000)] == [1, 1, 1, 2, 2, 4, 8]


def test_ramp_spreads_the_streams_of_every_process_over_one_interval() -> None:
    shares = [share for _, share in split_level([{}] * 40, 10, 3)]
    ramps = stream_ramps(shares, 2.0)
    delays = [ramp.delay_s(k) for ramp, share in zip(ramps, shares) for k in range(share)]
    assert delays == pytest.approx([0.2 * k for k in range(10)])
    assert stream_ramps(shares, 0.0) == [None] * len(shares)
