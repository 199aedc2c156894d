"""Block manager and scheduler bookkeeping, host-side only (no model)."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, StateSlotManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

BS = 4


def _seq(i: int, prompt: list[int], max_tokens: int = 5, spans=()) -> Sequence:
    return Sequence(i, f"r{i}", list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens, image_spans=spans)


def _run(sched: Scheduler, max_steps: int = 500) -> dict[int, list[tuple[int, int]]]:
    """Drive to completion; the 'model' emits token = num_tokens. Returns per-seq (start, n) chunks."""
    chunks: dict[int, list[tuple[int, int]]] = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return chunks
        out = sched.schedule()
        assert sum(s.num_new_tokens for s in out.scheduled) <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        sched.commit(out)
        for item in out.scheduled:
            chunks.setdefault(item.seq.seq_id, []).append((item.start, item.num_new_tokens))
            seq = item.seq
            if item.samples:
                seq.output_token_ids.append(seq.num_tokens)
                if seq.num_output_tokens >= seq.max_tokens:
                    sched.finish(seq, "length")
    raise AssertionError("did not finish")


def test_decodes_first_and_chunked_prefill_within_budget():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=6)
    a = _seq(0, list(range(3)), max_tokens=4)
    sched.add(a)
    sched.commit(first := sched.schedule())
    a.output_token_ids.append(99)
    b = _seq(1, list(range(20)))
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 5)]
    assert first.scheduled[0].samples and out.scheduled[0].samples and not out.scheduled[1].samples


def test_every_token_computed_once_and_blocks_returned():
    bm = BlockManager(64, BS, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=7)
    seqs = [_seq(i, list(range(100 * i, 100 * i + 3 + 5 * i)), max_tokens=6) for i in range(5)]
    for s in seqs:
        sched.add(s)
    chunks = _run(sched)
    for s in seqs:
        covered = [t for start, n in chunks[s.seq_id] for t in range(start, start + n)]
        assert covered == list(range(s.num_tokens - 1))
        assert s.finish_reason == "length" and s.num_output_tokens == 6
    assert bm.num_free_blocks == 64


def test_preemption_recomputes_and_returns_blocks():
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32)
    seqs = [_seq(i, list(range(7)), max_tokens=8) for i in range(3)]
    for s in seqs:
        sched.add(s)
    _run(sched)
    assert sched.num_preemptions > 0
    assert all(s.num_output_tokens == 8 for s in seqs)
    assert bm.num_free_blocks == 6


def test_prefix_cache_hit_and_image_keys():
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = list(range(10))
    a = _seq(0, prompt, max_tokens=1)
    sched.add(a)
    _run(sched)
    b = _seq(1, prompt, max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    # 10 tokens: 2 full blocks cached; both reused
    assert out.scheduled[0].start == 8 and b.num_cached_tokens == 8
    assert bm.stats().prefix_cache_hits == 8
    sched.finish(b, "abort")
    c = _seq(2, prompt, max_tokens=1, spans=((5, 7, "imgA"),))  # same ids, an image in block 1
    sched.add(c)
    out = sched.schedule()
    assert out.scheduled[0].start == 4  # block 0 shared, block 1 differs by image id
    sched.finish(c, "abort")
    assert bm.num_free_blocks == 32


def test_full_prompt_hit_still_computes_last_token():
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    a = _seq(0, list(range(8)), max_tokens=1)
    sched.add(a)
    _run(sched)
    b = _seq(1, list(range(8)), max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    assert out.scheduled[0].start == 4 and out.scheduled[0].num_new_tokens == 4


def test_abort_waiting_and_running_frees():
    bm = BlockManager(16, BS)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = _seq(0, list(range(9))), _seq(1, list(range(5)))
    sched.add(a)
    sched.add(b)
    sched.commit(sched.schedule())
    assert a in sched.running and b in sched.waiting
    sched.finish(b, "abort")
    sched.finish(a, "abort")
    assert bm.num_free_blocks == 16 and not sched.has_work()


def test_state_slots():
    slots = StateSlotManager(2)
    sched = Scheduler(BlockManager(32, BS), 4, 64, state_slots=slots)
    seqs = [_seq(i, [1, 2, 3], max_tokens=2) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert len(out.scheduled) == 2 and slots.num_free_slots == 0
    assert {s.seq.state_slot for s in out.scheduled} == {0, 1}
    sched.commit(out)
    _run(sched)
    assert slots.num_free_slots == 2
    with pytest.raises(ValueError):
        StateSlotManager(0)
