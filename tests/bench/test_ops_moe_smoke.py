"""bench/ops.py runs the MoE experts and decode families (CPU smoke: tiny sizes, checked vs the references)."""

from bench import ops as bench_ops


def test_moe_family_smoke(capsys) -> None:
    assert bench_ops.main(["--smoke", "--ops", "moe_experts"]) == 0
    assert "| moe_experts |" in capsys.readouterr().out


def test_moe_decode_family_smoke(capsys) -> None:
    assert bench_ops.main(["--smoke", "--ops", "moe_decode"]) == 0
    out = capsys.readouterr().out
    assert "moe_gate_route" in out and "moe_combine_add_rms_norm" in out
