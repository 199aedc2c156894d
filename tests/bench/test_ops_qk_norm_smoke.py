"""bench/ops.py runs the q/k norm + RoPE families (CPU smoke: tiny sizes, both paths checked vs the reference)."""

from bench import ops as bench_ops


def test_qk_norm_rope_family_smoke(capsys) -> None:
    assert bench_ops.main(["--smoke", "--ops", "qk_norm_rope"]) == 0
    out = capsys.readouterr().out
    assert "| qk_norm_rope |" in out and "|   norm, norm, rotary (old) |" in out


def test_qk_norm_rope_and_cache_family_smoke(capsys) -> None:
    assert bench_ops.main(["--smoke", "--ops", "qk_norm_rope_and_cache"]) == 0
    out = capsys.readouterr().out
    assert "| qk_norm_rope_and_cache |" in out and "|   qk_norm_rope + cache (old) |" in out
