"""bench/ops.py runs the MoE experts family (CPU smoke: tiny sizes, checked vs the references)."""

from bench import ops as bench_ops


def test_moe_family_smoke(capsys) -> None:
    assert bench_ops.main(["--smoke", "--ops", "moe_experts"]) == 0
    assert "| moe_experts |" in capsys.readouterr().out
