"""bench/ops.py runs the linear_small family (CPU smoke: tiny sizes, both paths checked vs the reference)."""

from bench import ops as bench_ops


def test_linear_small_family_runs_and_matches_the_reference():
    assert bench_ops.main(["--smoke", "--ops", "linear_small"]) == 0
