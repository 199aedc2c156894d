"""bench/ingress_stages.py still runs: every stage timed, the router's one image thread among them."""

from bench import ingress_stages


def test_ingress_stages_smoke(capsys) -> None:
    rows = ingress_stages.main(["--tiny", "qwen3_vl", "--image-size", "256", "--iters", "2", "--processor", "published"])
    names = [name for name, _, _ in rows]
    assert len(names) == 2 * 13  # smooth and noisy images
    # The published pixel budget keeps a 256px image as it is (the tiny checkpoint's would too).
    assert sum("image thread, all (256 -> 256 px)" in n for n in names) == 2
    assert sum("a known file with cached embeddings" in n for n in names) == 2
    assert all(where in ("client", "event loop", "thread") and ms >= 0 for _, where, ms in rows)
    assert "cache key (" in capsys.readouterr().out
