"""EngineProcess (the engine in its own process) against the in-process Engine on the tiny Qwen3-VL.

Every wait is bounded: a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import ContextLengthError, EngineDeadError, EngineInputError, MultimodalInputs, SamplingParams
from engine.core import EngineProcess
from engine.engine import Engine, EngineConfig
from engine.positions import expand_image_placeholders
from models.config import load_model_config

WAIT_S = 60.0
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def config(tiny_checkpoint) -> EngineConfig:
    return EngineConfig(model=str(tiny_checkpoint("qwen3_vl")), dtype="float32", device="cpu", max_model_len=512,
                        num_gpu_blocks=64, max_num_seqs=8)


@pytest.fixture(scope="module")
def process(config):
    engine = EngineProcess(config)
    yield engine
    engine.shutdown()


def _image_request(config: EngineConfig, seed: int) -> tuple[list[int], MultimodalInputs]:
    """A prompt with one 4-token image and random CPU embeddings of the model's shapes."""
    mc = load_model_config(config.model)
    grid, hidden = (1, 4, 4), mc.text.hidden_size
    tokens = 16 // mc.vision.spatial_merge_size**2
    gen = torch.Generator().manual_seed(seed)
    levels = len(mc.vision.deepstack_visual_indexes)
    mm = MultimodalInputs(torch.randn(tokens, hidden, generator=gen),
                          torch.randn(levels, tokens, hidden, generator=gen) if levels else None, (grid,))
    ids = [11, 12, mc.vision_start_token_id, mc.image_token_id, mc.vision_start_token_id + 1, 13, 14]
    return expand_image_placeholders(ids, mc.image_token_id, [tokens]), mm


def _requests(config: EngineConfig) -> list[tuple]:
    ids, mm = _image_request(config, seed=3)
    return [
        ("text-a", list(range(10, 40)), None, GREEDY),
        ("text-b", list(range(50, 63)), None, SamplingParams(max_tokens=6, temperature=0, logprobs=2)),
        ("image", ids, mm, GREEDY),
        ("seeded", list(range(70, 90)), None, SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True)),
    ]


async def _drain(stream) -> list:
    async def run():
        return [out async for out in stream]

    return await asyncio.wait_for(run(), WAIT_S)


async def _abort_after(engine, stream, n: int) -> list:
    """Every output of `stream`, its request aborted once `n` have arrived."""
    got = []

    async def read():
        async for out in stream:
            got.append(out)
            if len(got) == n:
                engine.abort(stream.request_id)

    await asyncio.wait_for(read(), WAIT_S)
    return got


def _summary(outs: list) -> tuple:
    """A stream's tokens, logprob count, finish reason and prompt size (deltas may merge differently)."""
    tokens = [t for o in outs for t in o.new_token_ids]
    logprobs = [(lp.token_id, round(lp.logprob, 4)) for o in outs for lp in (o.logprobs or [])]
    last = outs[-1]
    return tokens, logprobs, last.finish_reason, last.num_prompt_tokens, last.error


async def test_outputs_equal_the_in_process_engine(config, process):
    engine = Engine(config)
    try:
        want = [_summary(await _drain(s)) for s in engine.add_requests(_requests(config))]
    finally:
        engine.shutdown()
    got = [_summary(await _drain(s)) for s in process.add_requests(_requests(config))]
    assert got == want
    assert want[0][2] == want[2][2] == want[3][2] == "length" and want[1][2] in ("length", "stop")
    assert len(want[0][0]) == 12 and len(want[2][0]) == 12 and len(want[1][1]) == len(want[1][0])
    assert process.is_healthy()
    records = process.timeline().records
    assert records and sum(r.outputs for r in records) >= 12  # the child's own step records
    assert process.timeline(process.timeline().cursor).records == ()


async def test_abort_mid_stream_and_reuse_the_id(config, process):
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    a = process.add_request("a", list(range(10, 40)), None, long)
    b = process.add_request("b", list(range(20, 45)), None, SamplingParams(max_tokens=5, temperature=0,
                                                                             ignore_eos=True))
    got = await _abort_after(process, a, 3)
    # Deltas that queued before the abort may come merged into the final one.
    assert got[-1].finish_reason == "abort" and all(o.finish_reason is None for o in got[:-1])
    assert 3 <= sum(len(o.new_token_ids) for o in got) < 200
    assert _summary(await _drain(b))[2] == "length"
    # The id is free at once; the aborted request's late outputs never reach the new stream.
    again = _summary(await _drain(process.add_request("a", list(range(10, 40)), None, GREEDY)))
    first = _summary(await _drain(process.add_request("a2", list(range(10, 40)), None, GREEDY)))
    assert again == first and len(again[0]) == 12
    deadline = time.monotonic() + WAIT_S
    while (stats := process.stats())["num_free_blocks"] != stats["num_total_blocks"]:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["healthy"]


async def test_bad_requests_raise_at_once_and_queue_nothing(config, process):
    cursor = process.timeline().cursor
    sp = SamplingParams(max_tokens=3, temperature=0)
    with pytest.raises(EngineInputError):
        process.add_requests([("x", [5, 6, 7], None, sp), ("y", [10**7], None, sp)])
    with pytest.raises(EngineInputError):
        process.add_requests([("x", [5, 6, 7], None, sp), ("x", [8, 9], None, sp)])
    with pytest.raises(ContextLengthError):
        process.add_request("x", [5] * 600, None, sp)
    with pytest.raises(EngineInputError):
        process.add_request("x", [5, 6], MultimodalInputs(torch.zeros(4, 64), None, ((1, 4, 4),)), sp)
    with pytest.raises(EngineInputError):
        process.add_request("x", [5, 6], object(), sp)
    running = process.add_request("r", [5, 6, 7], None, SamplingParams(max_tokens=50, temperature=0,
                                                                       ignore_eos=True))
    with pytest.raises(EngineInputError):
        process.add_request("r", [5, 6], None, sp)
    assert _summary(await _drain(running))[2] == "length"
    # Only "r" ever reached the engine: its prefill is the first step after the cursor, alone.
    first = process.timeline(cursor).records[0]
    assert first.prefill_rows == 1 and first.prefill_tokens == 3


async def test_killed_engine_process_ends_every_stream_with_an_error(config):
    engine = EngineProcess(config)
    try:
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        streams = engine.add_requests([(f"k{i}", list(range(10 + i, 40 + i)), None, long) for i in range(2)])
        first = await asyncio.wait_for(streams[0].__anext__(), WAIT_S)
        assert first.finish_reason is None
        os.kill(engine.pid, signal.SIGKILL)
        ends = [(await _drain(s))[-1] for s in streams]
        assert [o.finish_reason for o in ends] == ["error", "error"] and all(o.error for o in ends)
        assert not engine.is_healthy() and engine.stats()["healthy"] is False
        with pytest.raises(EngineDeadError):
            engine.add_request("late", [5, 6], None, GREEDY)
    finally:
        started = time.monotonic()
        engine.shutdown()
        assert time.monotonic() - started < 10.0


async def test_shutdown_aborts_streams_and_joins_the_process(config):
    engine = EngineProcess(config)
    stream = engine.add_request("s", list(range(10, 40)), None,
                                SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    await asyncio.wait_for(stream.__anext__(), WAIT_S)
    engine.shutdown()
    assert (await _drain(stream))[-1].finish_reason == "abort"
    assert not engine._process.is_alive() and engine._process.exitcode == 0
    assert not engine.is_healthy()
    with pytest.raises(EngineDeadError):
        engine.add_request("t", [5, 6], None, GREEDY)


def test_engine_process_exits_with_its_parent(config):
    """A replica killed outright (SIGKILL) must not leave its engine process holding the device."""
    script = (
        "import time\n"
        "from engine.core import EngineProcess\n"
        "from engine.engine import EngineConfig\n"
        f"engine = EngineProcess(EngineConfig(**{_fields(config)!r}))\n"
        "print(engine.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while _running(pid):
        assert time.monotonic() < deadline, "the engine process outlived its parent"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # exited, not yet reaped by whoever adopted it


def test_start_up_errors_are_raised_with_the_childs_message(config, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(config.model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ") as info:
        EngineProcess(EngineConfig(**{**_fields(config), "model": str(broken)}))
    assert not isinstance(info.value, EngineDeadError)


def _fields(config: EngineConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def test_step_outputs_carry_every_field():
    from engine.core.messages import StepOutputs
    from engine.sequence import RequestOutput, TokenLogprobs

    outs = [RequestOutput("a", [1, 2], None, [TokenLogprobs(1, -0.5, (1, 3), (-0.5, -1.0))] * 2, 7, 3),
            RequestOutput("b", [], "error", None, 4, 0, "boom")]
    assert StepOutputs.of(outs).outputs() == outs


async def test_latest_stats_equal_stats_once_idle(config, process):
    """The snapshot on the step messages: the final one arrives with the last output, before its stream ends."""
    streams = process.add_requests([(f"l{i}", list(range(10 + i, 30 + i)), None, GREEDY) for i in range(3)])
    for stream in streams:
        await _drain(stream)
    latest = process.latest_stats()
    assert latest == process.stats() and latest["num_running"] == 0
    assert latest["num_free_blocks"] == latest["num_total_blocks"]
