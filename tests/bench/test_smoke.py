"""The GPU benchmarks' CPU smoke modes: a bench that no longer imports or runs fails here."""

from bench import decode, moe, vision


def test_vision_bench_smoke(capsys) -> None:
    vision.smoke()
    assert "smoke ok" in capsys.readouterr().out


def test_decode_bench_smoke(capsys) -> None:
    decode.smoke()
    assert "smoke ok" in capsys.readouterr().out


def test_moe_bench_smoke(capsys) -> None:
    """The in-memory MoE decode bench runs on the tiny MoE config: one table row per batch."""
    moe.main(["--smoke", "--batches", "1,4", "--context", "20"])
    assert capsys.readouterr().out.count("| tiny qwen3_vl_moe |") == 2
