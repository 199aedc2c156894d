"""Engine invariants on the tiny Qwen3-VL: batching, preemption, chunking, caching, sampling, abort."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest

from engine import LLM, ContextLengthError, EngineInputError, MultimodalInputs, SamplingParams
from engine.engine import Engine, EngineConfig
from tests.engine.helpers import TEXT, collect_aborting, image, prompt_ids

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return tiny_checkpoint("qwen3_vl")


@pytest.fixture(scope="module")
def base(path):
    llm = LLM(path, max_model_len=512, num_gpu_blocks=256, enable_prefix_caching=False)
    yield llm
    llm.shutdown()


def _mixed(tok) -> list[tuple[dict, SamplingParams]]:
    long_text = (TEXT + " ") * 3
    return [
        ({"prompt_token_ids": prompt_ids(tok, TEXT, 0)}, GREEDY),
        ({"prompt_token_ids": prompt_ids(tok, TEXT, 1), "images": [image(64, 96, 0)]},
         SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True)),
        ({"prompt_token_ids": prompt_ids(tok, TEXT, 2), "images": [image(96, 64, 1), image(128, 128, 2)]},
         SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.3, ignore_eos=True)),
        ({"prompt_token_ids": prompt_ids(tok, long_text, 0)},
         SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=5, ignore_eos=True)),
        ({"prompt_token_ids": prompt_ids(tok, "Models generate", 0)},
         SamplingParams(max_tokens=28, temperature=0.7, presence_penalty=0.5, frequency_penalty=0.4,
                        min_p=0.05, seed=11, ignore_eos=True)),
    ]


def _alone(llm: LLM, reqs) -> list[list[int]]:
    return [llm.generate([p], sp)[0].token_ids for p, sp in reqs]


def _assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


@pytest.fixture(scope="module")
def reference(base):
    reqs = _mixed(base.tokenizer)
    return reqs, _alone(base, reqs)


def test_batch_equals_alone(base, reference):
    reqs, alone = reference
    outs = base.generate([p for p, _ in reqs], [sp for _, sp in reqs])
    assert [o.token_ids for o in outs] == alone
    _assert_all_blocks_free(base)


def test_preemption_under_tiny_kv_budget(path, reference):
    reqs, alone = reference
    with LLM(path, max_model_len=512, num_gpu_blocks=5, enable_prefix_caching=False) as llm:
        outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
        assert [o.token_ids for o in outs] == alone
        assert llm.engine.stats()["num_preemptions"] > 0
        _assert_all_blocks_free(llm)


def test_chunked_prefill_splits_images(path, reference):
    reqs, alone = reference
    # Budget 7: prompts run in chunks of <= 7 tokens; image token runs (6, 6 and 16
    # tokens here) are cut mid-image, and decodes share steps with prefill chunks.
    with LLM(path, max_model_len=512, num_gpu_blocks=256, max_num_batched_tokens=7,
             enable_prefix_caching=False) as llm:
        outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
        assert [o.token_ids for o in outs] == alone
        _assert_all_blocks_free(llm)


def test_prefix_cache_hit_equals_miss(path, base, reference):
    reqs, alone = reference
    with LLM(path, max_model_len=512, num_gpu_blocks=256, block_size=4) as llm:
        first = _alone(llm, reqs)
        hits_before = llm.engine.stats()["prefix_cache_hits"]
        second = _alone(llm, reqs)
        assert first == second == alone
        assert llm.engine.stats()["prefix_cache_hits"] > hits_before
        # Same token ids, a different image: must not reuse the image's blocks.
        prompt, sp = reqs[1]
        other = {**prompt, "images": [image(64, 96, 99)]}
        got = llm.generate([other], sp)[0].token_ids
        assert got == base.generate([other], sp)[0].token_ids
        assert got != alone[1]
        _assert_all_blocks_free(llm)


def test_image_keys_come_from_the_pixels_not_the_embeddings(path, base, reference, monkeypatch):
    """`LLM` keys each image by its pixels; with prefix caching off nothing keys images at all:
    neither reads the embeddings back from the device to digest them."""
    from engine.multimodal import pixels_digest

    reqs, alone = reference
    prompt, sp = reqs[1]
    mm = base.encode_images(prompt["images"])
    assert mm.image_hashes == (pixels_digest(base.processor.resize(prompt["images"][0])),)

    given = MultimodalInputs.content_hashes

    def refuse(inputs, merge):
        if inputs.image_hashes is None:
            raise AssertionError("the embeddings were digested")
        return given(inputs, merge)

    monkeypatch.setattr(MultimodalInputs, "content_hashes", refuse)
    with LLM(path, max_model_len=512, num_gpu_blocks=256, block_size=4) as llm:  # prefix caching on
        assert _alone(llm, [reqs[1]]) == [alone[1]]
    unkeyed = MultimodalInputs(mm.image_embeds, mm.deepstack_embeds, mm.image_grid_thw)  # no image_hashes
    ids = base.prepare(prompt)[0]

    async def run() -> list[int]:
        tokens = []
        async for out in base.engine.add_request("unkeyed", ids, unkeyed, sp):
            tokens.extend(out.new_token_ids)
        return tokens

    assert base._loop.run_until_complete(run()) == alone[1]


def test_seeded_sampling_and_top_k_1(base, reference):
    reqs, alone = reference
    prompt, sp = reqs[1]
    again = base.generate([reqs[0][0], prompt, reqs[4][0]], [reqs[0][1], sp, reqs[4][1]])
    assert again[1].token_ids == alone[1]
    greedy = base.generate([prompt], GREEDY)[0].token_ids
    topk1 = base.generate([prompt], SamplingParams(max_tokens=24, temperature=1.5, top_k=1, ignore_eos=True))
    assert topk1[0].token_ids == greedy
    n2 = base.generate([prompt], SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True))[0]
    assert len(n2.outputs) == 2 and n2.outputs[0].token_ids == alone[1][:8]


def test_stop_tokens_and_max_tokens(base, reference):
    reqs, alone = reference
    prompt, _ = reqs[0]
    greedy = alone[0]
    stop = greedy[5]
    out = base.generate([prompt], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == greedy[: greedy.index(stop) + 1] and out.finish_reason == "stop"
    out = base.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.finish_reason == "length" and out.token_ids == greedy[:3]


def test_messages_prompt_and_data_url(base):
    buf = io.BytesIO()
    image(64, 64, 7).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": "What is this?"}]}]
    out = base.generate([{"messages": messages}], GREEDY)[0]
    text = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        tokenize=False, add_generation_prompt=True)
    ids = base.tokenizer.encode(text, add_special_tokens=False)
    ref = base.generate([{"prompt_token_ids": ids, "images": [image(64, 64, 7)]}], GREEDY)[0]
    assert out.token_ids == ref.token_ids and isinstance(out.text, str)


def test_bad_inputs_are_typed_errors(base):
    tok = base.tokenizer
    ids = prompt_ids(tok, TEXT, 1)
    with pytest.raises(EngineInputError) as err:
        base.generate([{"prompt_token_ids": ids}], GREEDY)  # image tokens, no image
    assert err.value.code is None and not isinstance(err.value, ContextLengthError)
    with pytest.raises(EngineInputError):
        base.generate([{"prompt_token_ids": prompt_ids(tok, TEXT, 0), "images": [image(64, 64, 0)]}], GREEDY)
    with pytest.raises(ContextLengthError) as err:
        base.generate([{"prompt_token_ids": [1] * 600}], GREEDY)  # over max_model_len
    assert (err.value.param, err.value.code) == ("prompt", "context_length_exceeded")
    with pytest.raises(EngineInputError):
        base.generate([{"prompt_token_ids": [10**7]}], GREEDY)
    with pytest.raises(ContextLengthError) as err:
        base.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=600))
    assert (err.value.param, err.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(EngineInputError):
        SamplingParams(temperature=-1)
    with pytest.raises(EngineInputError):
        SamplingParams(top_p=0)
    _assert_all_blocks_free(base)


async def test_abort_frees_blocks_and_ends_stream(path):
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", max_model_len=512,
                                 num_gpu_blocks=64, max_num_seqs=2))
    try:
        sp = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        a = engine.add_request("a", list(range(10, 40)), None, sp)
        b = engine.add_request("b", list(range(20, 45)), None, SamplingParams(max_tokens=5, temperature=0))
        c = engine.add_request("c", list(range(30, 70)), None, sp)  # waits (max_num_seqs=2)
        with pytest.raises(EngineInputError):
            engine.add_request("a", [1, 2], None, sp)
        with pytest.raises(EngineInputError):
            engine.add_request("d", [1, 2], MultimodalInputs(__import__("torch").zeros(4, 64), None, ((1, 4, 4),)), sp)
        got = await collect_aborting(engine, a, after=3, abort=["a", "c"])
        assert got[-1].finish_reason == "abort" and len(got) == 4
        assert [o.finish_reason async for o in c] == ["abort"]
        b_out = [o async for o in b]
        assert b_out[-1].finish_reason in ("length", "stop")
        await asyncio.sleep(0.05)
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_total_blocks"] == 64
        assert engine.is_healthy()
    finally:
        engine.shutdown()


async def test_slow_consumer_gets_merged_deltas(path):
    """Deltas that queue while the consumer is busy come merged, in order, logprobs included."""
    ids = list(range(10, 40))
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", max_model_len=512,
                                 num_gpu_blocks=64, enable_prefix_caching=False))
    try:
        # The reference: the same request read as fast as this loop can (on a loaded machine
        # even this reader can fall a step behind, so its deltas are not asserted one-token).
        fast = [out async for out in engine.add_request("fast", ids, None, sp)]
        want = [t for d in fast for t in d.new_token_ids]
        assert len(want) == 12
        deltas = []
        async for out in engine.add_request("slow", ids, None, sp):
            deltas.append(out)
            await asyncio.sleep(0.2)  # several engine steps pass meanwhile
        assert len(deltas) < 12 and max(len(d.new_token_ids) for d in deltas) > 1
        assert [t for d in deltas for t in d.new_token_ids] == want
        assert sum(len(d.logprobs) for d in deltas) == 12
        assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    finally:
        engine.shutdown()


async def test_step_outputs_reach_their_streams_in_order_with_one_wakeup():
    """put_many (a step's outputs) wakes the consumers' loop once and keeps each stream's order."""
    import threading

    from engine.sequence import RequestOutput
    from engine.stream import RequestStream, put_many

    loop = asyncio.get_running_loop()
    streams = [RequestStream(f"r{i}", lambda request_id: None) for i in range(3)]
    wakeups = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args):
        wakeups.append(callback)
        return original(callback, *args)

    loop.call_soon_threadsafe = counting
    try:
        steps = [[(s, RequestOutput(s.request_id, [10 * k + i])) for i, s in enumerate(streams)] for k in range(4)]
        steps[-1] = [(s, RequestOutput(s.request_id, [99], "length")) for s in streams]
        sender = threading.Thread(target=lambda: [put_many(items) for items in steps])
        sender.start()
        sender.join()
        got = [[t for out in [o async for o in s] for t in out.new_token_ids] for s in streams]
    finally:
        loop.call_soon_threadsafe = original
    assert len(wakeups) == len(steps)
    assert got == [[i, 10 + i, 20 + i, 99] for i in range(3)]


async def test_add_requests_queues_all_or_none_and_batches_them_together(path):
    """`add_requests`: a bad request (or a repeated id) queues none of the batch; a good batch reaches
    the step thread whole, so the first step prefills every request (no dependence on thread timing)."""
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", max_model_len=512,
                                 num_gpu_blocks=64, max_num_seqs=4))
    try:
        sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        with pytest.raises(EngineInputError):
            engine.add_requests([("a", [5, 6, 7], None, sp), ("b", [10**7], None, sp)])
        with pytest.raises(EngineInputError):
            engine.add_requests([("a", [5, 6, 7], None, sp), ("a", [8, 9], None, sp)])
        assert engine.timeline().records == () and engine.stats()["num_waiting"] == 0
        streams = engine.add_requests([(f"r{i}", list(range(10 + i, 30 + i)), None, sp) for i in range(3)])
        outs = [[o async for o in s] for s in streams]
        assert [sum(len(o.new_token_ids) for o in got) for got in outs] == [3, 3, 3]
        first = engine.timeline().records[0]
        assert first.prefill_rows == 3, first
    finally:
        engine.shutdown()
