"""Async scheduling (the next step launched before the host read this one's tokens) == the synchronous engine.

Token for token on CPU: greedy batches (the overlapped path), stops one step late
(max_tokens, stop tokens), sampling, penalties and logprobs mixed in (steps that
read their tokens first), requests arriving and finishing at every step, aborts,
Qwen3.5's state slots, and the CUDA-graph path (the CPU stand-in of
tests/engine/test_decode_inputs.py). Every run ends with all blocks and slots free.
"""

from __future__ import annotations

import asyncio

import pytest

from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphs, StaticInputs, bucket_sizes, width_buckets
from tests.engine.helpers import TEXT, image, prompt_ids
from tests.engine.test_decode_inputs import _EagerReplay

ARCHS = ["qwen3_vl", "qwen3_5"]
KW = dict(max_model_len=256, num_gpu_blocks=96, block_size=4, max_num_seqs=4, enable_prefix_caching=False)


def _prompts(tok) -> list[dict]:
    return [
        {"prompt_token_ids": prompt_ids(tok, TEXT, 0)},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 1), "images": [image(64, 96, 0)]},
        {"prompt_token_ids": prompt_ids(tok, TEXT[:20], 0)},
        {"prompt_token_ids": prompt_ids(tok, "Models generate", 0)},
        {"prompt_token_ids": prompt_ids(tok, (TEXT + " ") * 2, 0)},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 0)[:5]},
    ]


class DeviceTokens:
    """Counts decode inputs the runner read on the device (steps launched before the last was read)."""

    def __init__(self, runner) -> None:
        self.count, resolve = 0, runner._resolve

        def counting(ids):
            self.count += 1
            resolve(ids)

        runner._resolve = counting


def _assert_nothing_held(llm: LLM) -> None:
    s = llm.engine.stats()
    assert s["num_free_blocks"] == s["num_total_blocks"]
    assert s["num_free_state_slots"] == s["num_total_state_slots"]
    assert s["num_running"] == 0 and s["num_waiting"] == 0


def _run(path, overlap: bool, prompts_of, params_of, graphs: bool = False) -> tuple[list, int]:
    with LLM(path, async_scheduling=overlap, **KW) as llm:
        runner = llm.engine.executor.runner
        if graphs:
            inputs = StaticInputs.allocate(4, KW["max_model_len"], KW["block_size"],
                                           runner.model_config.text.vocab_size, runner.dtype, runner.device)
            replays = {(size, width): _EagerReplay(runner._decode_logits, inputs, size, width, [])
                       for size in bucket_sizes(4) for width in width_buckets(inputs.max_blocks, KW["block_size"])}
            runner.graphs = DecodeGraphs(inputs, replays)
        counter = DeviceTokens(runner)
        outs = llm.generate(prompts_of(llm.tokenizer), params_of(llm.tokenizer))
        _assert_nothing_held(llm)
    return [(o.token_ids, o.outputs[0].finish_reason, o.logprobs) for o in outs], counter.count


def _greedy(tok) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (7, 12, 3, 16, 9, 1)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_batch_equals_sync(tiny_checkpoint, arch, graphs):
    path = tiny_checkpoint(arch)
    want, none = _run(path, False, _prompts, _greedy, graphs)
    got, overlapped = _run(path, True, _prompts, _greedy, graphs)
    assert got == want
    assert none == 0 and overlapped >= 5  # decode steps that read their input ids on the device
    assert [len(t) for t, _, _ in got] == [7, 12, 3, 16, 9, 1]


class Discards:
    """Counts tokens of launched steps for sequences that had already stopped (computed, then dropped)."""

    def __init__(self, engine) -> None:
        self.count, process = 0, engine._process_launched

        def counting(item, result):
            finished = {s.seq.seq_id for s in item.out.scheduled if s.seq.is_finished}
            self.count += sum(i in finished for i in result.seq_ids)
            return process(item, result)

        engine._process_launched = counting


def _run_counting(path, overlap: bool, params_of) -> tuple[list, int, int]:
    with LLM(path, async_scheduling=overlap, **KW) as llm:
        counter, discards = DeviceTokens(llm.engine.executor.runner), Discards(llm.engine)
        outs = llm.generate(_prompts(llm.tokenizer), params_of(llm.tokenizer))
        _assert_nothing_held(llm)
    return [(o.token_ids, o.outputs[0].finish_reason, o.logprobs) for o in outs], counter.count, discards.count


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_tokens_one_step_late_equal_sync(tiny_checkpoint, arch):
    """Stop tokens met mid-stream: under async scheduling the step after a stop was already
    launched; its token for the stopped sequence is dropped."""
    path = tiny_checkpoint(arch)
    long = lambda tok: [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)] * 6  # noqa: E731
    plain, _ = _run(path, False, _prompts, long)
    stops = [tokens[len(tokens) * 2 // 3] for tokens, _, _ in plain]

    def params(tok) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[s]) for s in stops]

    want, _, _ = _run_counting(path, False, params)
    got, overlapped, dropped = _run_counting(path, True, params)
    assert got == want
    assert sum(r == "stop" for _, r, _ in got) >= 4
    assert overlapped > 0 and dropped > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_penalties_and_logprobs_equal_sync(tiny_checkpoint, arch):
    """Rows that sample, penalize or return logprobs read their step's tokens before the next
    launches; the greedy rows around them overlap once they are gone."""
    path = tiny_checkpoint(arch)

    def params(tok) -> list[SamplingParams]:
        ps = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (18, 3, 14, 16, 3, 3)]
        ps[1] = SamplingParams(max_tokens=4, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
        ps[4] = SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.3, ignore_eos=True)
        ps[5] = SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True)
        return ps

    want, _ = _run(path, False, _prompts, params)
    got, overlapped = _run(path, True, _prompts, params)
    assert [(t, r) for t, r, _ in got] == [(t, r) for t, r, _ in want]
    assert [[(lp.token_id, lp.top_ids) for lp in got[5][2]]] == [[(lp.token_id, lp.top_ids) for lp in want[5][2]]]
    assert overlapped > 0


async def _arrivals(engine, prompts: list[list[int]], params: list[SamplingParams], abort_at: int) -> list[list[int]]:
    """Request i + 1 arrives once request i has its first token; request 0 is aborted after `abort_at` deltas."""
    results: list[list[int]] = [[] for _ in prompts]
    first = [asyncio.Event() for _ in prompts]

    async def consume(i: int) -> None:
        if i:
            await first[i - 1].wait()
        stream = engine.add_request(f"r{i}", prompts[i], None, params[i])
        n = 0
        async for out in stream:
            results[i].extend(out.new_token_ids)
            first[i].set()
            n += 1
            if i == 0 and n == abort_at:
                engine.abort("r0")
        first[i].set()

    await asyncio.gather(*(consume(i) for i in range(len(prompts))))
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_arrivals_finishes_and_abort_every_step(tiny_checkpoint, arch):
    """Requests join and leave at every step, one aborted mid-stream: each stream equals the request run alone."""
    path = tiny_checkpoint(arch)
    with LLM(path, async_scheduling=True, **KW) as llm:
        counter = DeviceTokens(llm.engine.executor.runner)
        tok = llm.tokenizer
        prompts = [p["prompt_token_ids"] for i, p in enumerate(_prompts(tok)) if i != 1]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (40, 4, 6, 3, 8)]
        got = llm._loop.run_until_complete(_arrivals(llm.engine, prompts, params, abort_at=9))
        llm._loop.run_until_complete(asyncio.sleep(0.05))
        _assert_nothing_held(llm)
    with LLM(path, async_scheduling=False, **KW) as llm:
        alone = [llm.generate([{"prompt_token_ids": p}], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert got[1:] == alone[1:]
    assert 0 < len(got[0]) < 40 and got[0] == alone[0][: len(got[0])]
    assert counter.count > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_beside_decodes_equals_sync(tiny_checkpoint, arch):
    """A prompt chunked so that its last chunk is one token, beside decoding rows: that step's
    prompt row reads no device token, its decode rows do."""
    path = tiny_checkpoint(arch)
    kw = dict(KW, max_num_batched_tokens=8)
    # Step 1: 5 + 3 prompt tokens; step 2: a decode + 7 of the second prompt; step 3: a decode + its last one.
    prompts = [list(range(20, 25)), list(range(30, 41))]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 6)]
    results = {}
    for overlap in (False, True):
        with LLM(path, async_scheduling=overlap, **kw) as llm:
            counter = DeviceTokens(llm.engine.executor.runner)
            async def read(stream) -> list[int]:
                return [t async for out in stream for t in out.new_token_ids]

            async def run(engine) -> list[list[int]]:
                with engine._lock:  # both queued before the step thread schedules anything
                    streams = [engine.add_request(f"r{i}", p, None, sp)
                               for i, (p, sp) in enumerate(zip(prompts, params))]
                return list(await asyncio.gather(*(read(s) for s in streams)))

            results[overlap] = llm._loop.run_until_complete(run(llm.engine))
            llm._loop.run_until_complete(asyncio.sleep(0.05))
            _assert_nothing_held(llm)
    assert results[True] == results[False]
    assert [len(t) for t in results[True]] == [12, 6] and counter.count > 0


class MixedLaunches:
    """Counts general batches (prompt chunks in the step) whose decode rows read their input on the device."""

    def __init__(self, runner) -> None:
        self.count, assemble = 0, runner._assemble

        def counting(steps, ids, *rest):
            self.count += min(ids) < 0 and any(s.num_new_tokens > 1 for s in steps)
            return assemble(steps, ids, *rest)

        runner._assemble = counting


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_chunks_launch_early_beside_device_decodes(tiny_checkpoint, arch):
    """A small step budget: image and text prompts are chunked beside running decodes, and those
    mixed steps launch before the step in flight is read (its tokens taken on the device, image rows
    placed from a host-built index): token for token the synchronous engine's."""
    path = tiny_checkpoint(arch)
    kw = dict(KW, max_num_batched_tokens=6)
    results, mixed = {}, {}
    for overlap in (False, True):
        with LLM(path, async_scheduling=overlap, **kw) as llm:
            counter = MixedLaunches(llm.engine.executor.runner)
            outs = llm.generate(_prompts(llm.tokenizer), _greedy(llm.tokenizer))
            _assert_nothing_held(llm)
        results[overlap] = [o.token_ids for o in outs]
        mixed[overlap] = counter.count
    assert results[True] == results[False]
    assert mixed[False] == 0 and mixed[True] >= 3


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_under_early_mixed_launches_equals_sync(tiny_checkpoint, arch):
    """KV blocks for about two sequences, prompts chunked beside decodes: sequences are preempted
    while mixed steps launch early; the tokens equal the synchronous engine's, and every block and
    slot comes back."""
    path = tiny_checkpoint(arch)
    kw = dict(KW, max_num_batched_tokens=6, num_gpu_blocks=24)
    results, preempted, mixed = {}, {}, {}
    for overlap in (False, True):
        with LLM(path, async_scheduling=overlap, **kw) as llm:
            counter = MixedLaunches(llm.engine.executor.runner)
            tok = llm.tokenizer
            prompts = [p for i, p in enumerate(_prompts(tok)) if i != 4]  # the longest would not fit alone
            params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (20, 14, 24, 18, 9)]
            outs = llm.generate(prompts, params)
            preempted[overlap] = llm.engine.stats()["num_preemptions"]
            _assert_nothing_held(llm)
        results[overlap] = [o.token_ids for o in outs]
        mixed[overlap] = counter.count
    assert results[True] == results[False]
    assert preempted[True] > 0 and mixed[True] > 0
