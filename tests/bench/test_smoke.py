"""The GPU benchmarks' CPU smoke modes: a bench that no longer imports or runs fails here."""

import pytest

from bench import decode, moe, vision


def test_vision_bench_smoke(capsys) -> None:
    vision.smoke()
    assert "smoke ok" in capsys.readouterr().out


def test_decode_bench_smoke(capsys) -> None:
    decode.smoke()
    assert "smoke ok" in capsys.readouterr().out


@pytest.mark.parametrize("arch", [None, "qwen3_5_moe"])
def test_moe_bench_smoke(capsys, arch: str | None) -> None:
    """The in-memory MoE decode bench runs on a tiny MoE config (Qwen3.5's with its state slots):
    one table row per batch."""
    moe.main(["--smoke", "--batches", "1,4", "--context", "20", *(["--model", arch] if arch else [])])
    assert capsys.readouterr().out.count(f"| tiny {arch or 'qwen3_vl_moe'} |") == 2


def test_moe_bench_times_each_pdl_setting(capsys) -> None:
    moe.main(["--smoke", "--batches", "1", "--context", "20", "--pdl", "on,off"])
    out = capsys.readouterr().out
    assert "batch 1 pdl on moe-fused" in out and "batch 1 pdl off moe-fused" in out
    assert out.count("| tiny qwen3_vl_moe |") == 2


def test_decode_bench_pdl_settings_parse() -> None:
    assert decode.parse_args(["--pdl", "on,off"]).pdl == [True, False]
    assert decode.parse_args(["--pdl", "off"]).pdl == [False]
    with pytest.raises(SystemExit):
        decode.parse_args(["--pdl", "maybe"])
    with pytest.raises(SystemExit):
        decode.parse_args(["--pdl", "on,off", "--tp", "2"])


def test_moe_bench_times_fused_decode_on_and_off(capsys) -> None:
    moe.main(["--smoke", "--batches", "1", "--context", "20", "--moe-fused", "on,off", "--moe-block", "off"])
    out = capsys.readouterr().out
    assert "moe-fused on moe-block off stream-wide off " in out and "moe-fused off moe-block off stream-wide off " in out
    assert out.count("| tiny qwen3_vl_moe |") == 2


def test_moe_bench_times_block_kernel_on_and_off(capsys) -> None:
    moe.main(["--smoke", "--batches", "1", "--context", "20", "--moe-block", "on,off"])
    out = capsys.readouterr().out
    assert "moe-block on stream-wide off " in out and "moe-block off stream-wide off " in out
    assert out.count("| tiny qwen3_vl_moe |") == 2


def test_moe_bench_times_streamed_wide_linears_on_and_off(capsys) -> None:
    moe.main(["--smoke", "--batches", "1", "--context", "20", "--stream-wide", "on,off"])
    out = capsys.readouterr().out
    assert "stream-wide on " in out and "stream-wide off " in out
    assert out.count("| tiny qwen3_vl_moe |") == 2


def test_vit_attention_bench_smoke(capsys) -> None:
    """Ours and SDPA's math backend on the same tiny inputs: both timed, ours close to the fp32 reference."""
    from bench import vit_attention

    rows = vit_attention.main(["--smoke"])
    assert {r["impl"] for r in rows} == {"ours", "sdpa math"}
    assert all(r["ms"] > 0 and r["max_err"] < 1e-4 for r in rows), rows
    assert "ViT attention" in capsys.readouterr().out


def test_ops_bench_times_attention_per_sm90_setting(capsys) -> None:
    """`--attn-sm90 on,off`: each varlen_attention case once per setting, on adjacent rows."""
    from bench import ops as bench_ops

    assert bench_ops.main(["--smoke", "--ops", "varlen_attention", "--attn-sm90", "on,off"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| varlen_attention |")]
    assert [r.split("|")[2].strip().rsplit(" ", 1)[1] for r in rows] == ["sm90=on", "sm90=off"] * 3, rows
    with pytest.raises(SystemExit):
        bench_ops.main(["--smoke", "--ops", "varlen_attention", "--attn-sm90", "maybe"])


def test_moe_bench_times_every_combination_of_the_batch_1_fusions(capsys) -> None:
    moe.main(["--smoke", "--batches", "1", "--context", "20", "--norm-qkv", "on,off", "--decode-merge", "on,off"])
    out = capsys.readouterr().out
    for norm in ("on", "off"):
        for merge in ("on", "off"):
            assert f"norm-qkv {norm} decode-merge {merge}:" in out
    assert out.count("| tiny qwen3_vl_moe |") == 4
