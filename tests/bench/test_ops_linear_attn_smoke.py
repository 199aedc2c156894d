"""bench/ops.py runs the Qwen3.5 linear-attention families (CPU smoke: tiny sizes, checked vs references)."""

from bench import ops as bench_ops


def test_linear_attention_families_smoke(capsys) -> None:
    families = ["causal_conv1d", "gated_delta_rule", "gated_rms_norm", "qwen3_5_fusions"]
    assert bench_ops.main(["--smoke", "--ops", *families]) == 0
    out = capsys.readouterr().out
    for op in ("causal_conv1d_fwd", "causal_conv1d_update", "gated_delta_rule_chunked",
               "gated_delta_rule_recurrent", "gated_rms_norm", "gdn_gating", "sigmoid_gate_mul"):
        assert f"| {op} |" in out
    # the old path of each fused piece (offset norm, gating, output gate), in the same table
    assert out.count("|   composed (old) |") == 3
