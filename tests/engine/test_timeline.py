"""The step timeline: the ring buffer's cursor semantics, the engine's record per step, its cost."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from engine import SamplingParams
from engine.engine import Engine, EngineConfig
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence
from engine.timeline import StepRecord, ThreadUsage, Timeline, count_rows


def test_ring_buffer_keeps_the_last_records_in_order() -> None:
    tl: Timeline[int] = Timeline(4)
    first = tl.read()
    assert first.records == () and first.cursor == 0 and first.dropped == 0
    for i in range(3):
        tl.append(i)
    got = tl.read(0)
    assert got.records == (0, 1, 2) and got.cursor == 3 and got.dropped == 0
    assert tl.read(got.cursor).records == ()  # nothing new since the cursor
    for i in range(3, 10):
        tl.append(i)
    # Only the last 4 of 10 are held; a reader at cursor 3 lost 3..5.
    late = tl.read(got.cursor)
    assert late.records == (6, 7, 8, 9) and late.cursor == 10 and late.dropped == 3
    assert tl.read(8).records == (8, 9) and tl.read(8).dropped == 0
    # A cursor past the end is a mark: nothing, and the cursor to read from later.
    mark = tl.read(1 << 62)
    assert mark.records == () and mark.cursor == 10 and mark.dropped == 0
    tl.append(10)
    assert tl.read(mark.cursor).records == (10,)
    with pytest.raises(ValueError):
        Timeline(0)


def _item(start: int, n: int, prompt: int) -> SimpleNamespace:
    return SimpleNamespace(start=start, num_new_tokens=n, seq=SimpleNamespace(num_prompt_tokens=prompt))


def test_count_rows_tells_decodes_from_prompt_chunks() -> None:
    items = [_item(10, 1, 10), _item(0, 8, 12), _item(11, 1, 12), _item(3, 1, 5), _item(4, 3, 4)]
    # (10, 1) past a 10-token prompt decodes; (11, 1) is the last prompt token of 12; (4, 3)
    # recomputes generated tokens after a preemption: prefill.
    assert count_rows(items) == (1, 4, 8 + 1 + 1 + 3)


# Three requests, prompts of 10, 7 and 4 tokens, 3 output tokens each, a budget of 8 tokens
# per step, all queued before the first step. The scheduler's policy (running sequences first,
@pytest.mark.skipif(ThreadUsage.now() == ThreadUsage(), reason="no per-thread rusage on this OS")
def test_thread_usage_tells_computing_from_waiting() -> None:
    """CPU time grows while the thread computes, not while it sleeps; sleeping is a voluntary switch."""
    a = ThreadUsage.now()
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:
        pass
    b = ThreadUsage.now()
    for _ in range(5):
        time.sleep(0.01)
    c = ThreadUsage.now()
    busy, slept = b - a, c - b
    assert busy.cpu_s >= 0.03 and slept.cpu_s < 0.02
    assert slept.voluntary_switches >= 5
    assert (busy + slept).cpu_s == pytest.approx(busy.cpu_s + slept.cpu_s)


# decodes before prompt chunks, then the waiting queue in order, each taking what the budget
# leaves) gives, per step, (decode rows, prefill rows, prefill tokens, outputs):
#   1: A 8 of 10                      -> (0, 1, 8, 0)
#   2: A last 2 (samples), B 6 of 7   -> (0, 2, 8, 1)
#   3: A decode, B last 1, C all 4    -> (1, 2, 5, 3)
#   4: A (3rd token: done), B, C      -> (3, 0, 0, 3)
#   5: B, C (3rd tokens: done)        -> (2, 0, 0, 2)
PROMPTS = {"a": 10, "b": 7, "c": 4}
EXPECTED = [(0, 1, 8, 0), (0, 2, 8, 1), (1, 2, 5, 3), (3, 0, 0, 3), (2, 0, 0, 2)]


async def _settled(engine: Engine, since: int):
    """The records from `since` once the loop went idle (a step's record follows its outputs)."""
    for _ in range(500):
        await asyncio.sleep(0.01)
        if not engine.scheduler.has_work() and engine.timeline(1 << 62).cursor > since:
            break
    await asyncio.sleep(0.05)
    return engine.timeline(since)


@pytest.mark.parametrize("overlap", [False, True])
async def test_engine_records_each_step_as_scheduled(tiny_checkpoint, overlap: bool) -> None:
    engine = Engine(EngineConfig(model=str(tiny_checkpoint("qwen3_vl")), dtype="float32", device="cpu",
                                 max_model_len=128, num_gpu_blocks=64, max_num_batched_tokens=8,
                                 enable_prefix_caching=False, async_scheduling=overlap))
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        mark = engine.timeline(1 << 62).cursor
        with engine._lock:  # all three queued before the step thread schedules anything
            streams = [engine.add_request(rid, list(range(20, 20 + n)), None, sp) for rid, n in PROMPTS.items()]

        async def drain(stream) -> int:
            return sum([len(out.new_token_ids) async for out in stream])

        assert await asyncio.gather(*(drain(s) for s in streams)) == [3, 3, 3]
        read = await _settled(engine, mark)
        recs = read.records
        assert [(r.decode_rows, r.prefill_rows, r.prefill_tokens, r.outputs) for r in recs] == EXPECTED
        assert read.cursor == mark + len(EXPECTED) and read.dropped == 0
        assert [r.waiting for r in recs] == [2, 1, 0, 0, 0]
        for prev, rec in zip(recs, recs[1:]):
            if overlap:  # a step launches while the one before runs, never earlier
                assert prev.start <= rec.start and prev.end <= rec.end
            else:
                assert prev.end <= rec.start  # in order, one at a time
        for prev, rec in zip(recs, recs[2:]):
            assert prev.end <= rec.start
        for rec in recs:
            phases = rec.schedule_s + rec.message_s + rec.execute_s + rec.process_s
            assert min(rec.schedule_s, rec.message_s, rec.execute_s, rec.process_s, rec.idle_s, rec.lock_s) >= 0
            assert phases <= rec.duration_s + 1e-9 and rec.execute_s > 0
            # The loop thread computed the model step on CPU: it used CPU time, within the step's span.
            assert 0 < rec.usage.cpu_s <= rec.duration_s + 0.02

        # The loop then waits for work: the next step's record holds that wait as idle time.
        await asyncio.sleep(0.3)
        assert await drain(engine.add_request("d", list(range(20, 26)), None, sp)) == 3
        later = (await _settled(engine, read.cursor)).records
        assert later[0].idle_s >= 0.3 and all(r.idle_s < 0.3 for r in later[1:])
        assert later[0].start - recs[-1].end >= 0.3
    finally:
        engine.shutdown()


def test_recording_costs_microseconds_per_step(capsys) -> None:
    """What `Engine._step` adds per step at batch 64: 7 clock reads, the row counts, one record."""
    seqs = [Sequence(i, str(i), list(range(100)), SamplingParams(), 16) for i in range(64)]
    scheduled = [ScheduledSeq(s, 100, 1, True) for s in seqs[:63]] + [ScheduledSeq(seqs[63], 0, 100, True)]
    tl: Timeline[StepRecord] = Timeline()
    clock = time.monotonic
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        a, b, c, d, e, f, g = clock(), clock(), clock(), clock(), clock(), clock(), clock()
        decode, prefill, tokens = count_rows(scheduled)
        tl.append(StepRecord(c, g, c - b, b - a, d - c, e - d, f - e, g - f, decode, prefill, tokens, 64, 0))
    per_step_us = (time.perf_counter() - t0) / n * 1e6
    last = tl.read(0).records[-1]
    assert (last.decode_rows, last.prefill_rows, last.prefill_tokens) == (63, 1, 100)
    with capsys.disabled():
        print(f"\ntimeline recording: {per_step_us:.2f} us per step (64 rows)")


async def test_async_records_do_not_count_the_next_launch(tiny_checkpoint) -> None:
    """Under async scheduling the loop launches step n+1 before it collects step n: that launch is
    n+1's host time. Every phase is a disjoint interval of the one loop thread, so the phases of all
    records fit in the records' span, and the records' own times tile it (one step per TPOT)."""
    engine = Engine(EngineConfig(model=str(tiny_checkpoint("qwen3_vl")), dtype="float32", device="cpu",
                                 max_model_len=128, num_gpu_blocks=64, enable_prefix_caching=False,
                                 async_scheduling=True))
    launch = engine.executor.launch
    host_s = 0.03

    def slow_launch(msg):  # host work in the launch that the GPU would not see
        time.sleep(host_s)
        return launch(msg)

    engine.executor.launch = slow_launch
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    try:
        mark = engine.timeline(1 << 62).cursor
        assert len([t async for out in engine.add_request("a", list(range(20, 30)), None, sp)
                    for t in out.new_token_ids]) == 8
        recs = (await _settled(engine, mark)).records
        assert len(recs) == 8 and sum(r.prefill_rows for r in recs) == 1
        overlapped = sum(1 for prev, rec in zip(recs, recs[1:]) if rec.start < prev.end)
        assert overlapped >= 5  # the decodes after the first launch early
        span = recs[-1].end - recs[0].start
        phases = [r.schedule_s + r.message_s + r.execute_s + r.process_s for r in recs]
        assert sum(phases) + sum(r.lock_s + r.idle_s for r in recs[1:]) <= span + 1e-6
        assert all(host_s <= r.execute_s for r in recs)  # each its own launch, once
        from bench.timeline import own_times_s

        own = own_times_s(recs)
        assert sum(own) == pytest.approx(span) and min(own) > 0
        assert all(o <= r.duration_s + 1e-9 for o, r in zip(own, recs))
    finally:
        engine.shutdown()
