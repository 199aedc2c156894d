"""Qwen3.5 (hybrid Gated DeltaNet) through the engine: greedy generation vs transformers,
and the state slots of the linear-attention layers under batching, chunked prefill,
slot reuse, preemption and abort."""

from __future__ import annotations

import asyncio

import pytest

from engine import LLM, SamplingParams
from engine.engine import Engine, EngineConfig
from tests.engine.helpers import (
    TEXT,
    HFReference,
    arch_llm_fixture,
    assert_greedy_matches,
    collect_aborting,
    image,
    prompt_ids,
)
from tests.engine.test_engine import _alone, _mixed

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
ARCHS = ["qwen3_5", "qwen3_5_moe"]


def _assert_nothing_held(llm_or_engine) -> None:
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_free_state_slots"] == stats["num_total_state_slots"] > 0
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


arch_llm = arch_llm_fixture(ARCHS)


def test_greedy_matches_transformers(arch_llm):
    path, llm = arch_llm
    hf = HFReference(path)
    tok = llm.tokenizer
    cases = {
        "text": (prompt_ids(tok, (TEXT + " ") * 4, 0), []),  # > 64 tokens: several delta-rule chunks
        "one_image": (prompt_ids(tok, TEXT, 1), [image(64, 96, 0)]),
        "two_images": (prompt_ids(tok, TEXT, 2), [image(96, 64, 1), image(128, 128, 2)]),
    }
    assert len(cases["text"][0]) > 64
    assert_greedy_matches(llm, hf, cases, GREEDY)
    _assert_nothing_held(llm)
    assert not llm.engine.scheduler.blocks.enable_prefix_caching  # off for hybrid models


@pytest.fixture(scope="module")
def reference(arch_llm):
    """Each mixed-sampling request run alone (greedy, seeded sampling, penalties, images)."""
    path, llm = arch_llm
    reqs = _mixed(llm.tokenizer)
    return path, reqs, _alone(llm, reqs)


def test_batch_equals_alone(arch_llm, reference):
    _, llm = arch_llm
    _, reqs, alone = reference
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
    assert [o.token_ids for o in outs] == alone
    _assert_nothing_held(llm)


def test_chunked_prefill_and_slot_reuse(reference):
    """Chunks of <= 7 tokens carry the state across steps; 2 slots serve 5 requests in turn."""
    path, reqs, alone = reference
    with LLM(path, max_model_len=512, num_gpu_blocks=256, max_num_batched_tokens=7, max_num_seqs=2) as llm:
        assert llm.engine.stats()["num_total_state_slots"] == 2
        outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
        assert [o.token_ids for o in outs] == alone
        _assert_nothing_held(llm)


def test_preemption_restarts_state(reference):
    path, reqs, alone = reference
    with LLM(path, max_model_len=512, num_gpu_blocks=6) as llm:
        outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
        assert [o.token_ids for o in outs] == alone
        assert llm.engine.stats()["num_preemptions"] > 0
        _assert_nothing_held(llm)


async def test_abort_frees_slots_and_blocks(reference):
    """Aborted requests give back slot and blocks; the next request in that slot starts clean."""
    path, reqs, alone = reference
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", max_model_len=512,
                                 num_gpu_blocks=64, max_num_seqs=2))
    try:
        sp = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        a = engine.add_request("a", list(range(10, 90)), None, sp)
        b = engine.add_request("b", list(range(20, 45)), None, sp)
        waiting = engine.add_request("c", list(range(30, 70)), None, sp)  # no slot left: waits
        got = await collect_aborting(engine, a, after=3, abort=["a", "c"])
        assert got[-1].finish_reason == "abort"
        assert [o.finish_reason async for o in waiting] == ["abort"]
        # "d" takes a's slot (a's state is stale there) while b keeps decoding.
        prompt, params = reqs[0]
        d = engine.add_request("d", prompt["prompt_token_ids"], None, params)
        tokens = [t async for o in d for t in o.new_token_ids]
        assert tokens == alone[0]
        engine.abort("b")
        await asyncio.sleep(0.05)
        _assert_nothing_held(engine)
        assert engine.is_healthy()
    finally:
        engine.shutdown()
