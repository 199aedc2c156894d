"""The GPU benchmarks' CPU smoke modes: a bench that no longer imports or runs fails here."""

from bench import decode, vision


def test_vision_bench_smoke(capsys) -> None:
    vision.smoke()
    assert "smoke ok" in capsys.readouterr().out


def test_decode_bench_smoke(capsys) -> None:
    decode.smoke()
    assert "smoke ok" in capsys.readouterr().out
