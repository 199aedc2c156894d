"""EngineProcess with tensor_parallel_size 2 (TP workers over gloo, driven from the engine process)
against the in-process TP=1 Engine on the tiny Qwen3-VL.

The engine process joins this test's Ray cluster as a driver of its own and owns the worker
actors: killing it must end the streams with "error" and take the workers down with it.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from engine import EngineDeadError, SamplingParams  # noqa: E402
from engine.core import EngineProcess, RayLink  # noqa: E402
from engine.engine import Engine, EngineConfig  # noqa: E402
from tests.engine.test_core_process import WAIT_S, _abort_after, _drain, _image_request  # noqa: E402
from tests.engine.test_tp import local_ray  # noqa: E402, F401  (a fixture: this module's own Ray)

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def config(tiny_checkpoint) -> EngineConfig:
    return EngineConfig(model=str(tiny_checkpoint("qwen3_vl")), dtype="float32", device="cpu", max_model_len=512,
                        num_gpu_blocks=64, max_num_seqs=8, step_timeout_s=60)


@pytest.fixture(scope="module")
def tp2(local_ray, config):
    engine = EngineProcess(dataclasses.replace(config, tensor_parallel_size=2))
    yield engine
    engine.shutdown()


def _requests(config: EngineConfig) -> list[tuple]:
    ids, mm = _image_request(config, seed=4)
    return [("text", list(range(10, 40)), None, GREEDY), ("image", ids, mm, GREEDY)]


def _alive(actor_id: str) -> bool:
    return ray._private.state.actors(actor_id=actor_id)["State"] != "DEAD"  # the GCS' actor table


async def test_tp2_process_equals_the_tp1_engine(config, tp2):
    engine = Engine(config)
    try:
        want = [[t for o in await _drain(s) for t in o.new_token_ids] for s in engine.add_requests(_requests(config))]
    finally:
        engine.shutdown()
    outs = [await _drain(s) for s in tp2.add_requests(_requests(config))]
    assert [[t for o in out for t in o.new_token_ids] for out in outs] == want
    assert [out[-1].finish_reason for out in outs] == ["length", "length"] and len(want[1]) == 12
    assert tp2.is_healthy() and len(tp2.worker_ids) == 2 and all(_alive(w) for w in tp2.worker_ids)
    assert sum(r.outputs for r in tp2.timeline().records) >= 12  # the engine process' own step records


async def test_tp2_abort_mid_stream(tp2):
    a = tp2.add_request("a", list(range(10, 40)), None, SamplingParams(max_tokens=300, temperature=0,
                                                                        ignore_eos=True))
    got = await _abort_after(tp2, a, 2)
    assert got[-1].finish_reason == "abort" and 2 <= sum(len(o.new_token_ids) for o in got) < 300
    deadline = time.monotonic() + WAIT_S
    while (stats := tp2.stats())["num_running"] or stats["num_free_blocks"] != stats["num_total_blocks"]:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)
    assert stats["healthy"]


async def test_killed_tp2_process_fails_streams_and_its_workers_die(local_ray, config):
    engine = EngineProcess(dataclasses.replace(config, tensor_parallel_size=2))
    workers = engine.worker_ids
    try:
        stream = engine.add_request("k", list(range(10, 40)), None,
                                    SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        assert (await asyncio.wait_for(stream.__anext__(), WAIT_S)).finish_reason is None
        os.kill(engine.pid, signal.SIGKILL)
        end = (await _drain(stream))[-1]
        assert end.finish_reason == "error" and end.error
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError):
            engine.add_request("late", [5, 6], None, GREEDY)
    finally:
        engine.shutdown()
    # Ray kills the actors of an owner (the engine process' driver) that died.
    deadline = time.monotonic() + WAIT_S
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "the TP workers outlived their engine process"
        await asyncio.sleep(0.2)


async def test_killed_idle_tp_worker_is_noticed(local_ray, config):
    """A rank dying between steps: the engine process notices it (it checks its workers while idle)."""
    engine = EngineProcess(dataclasses.replace(config, tensor_parallel_size=2))
    try:
        assert engine.is_healthy()
        os.kill(ray._private.state.actors(actor_id=engine.worker_ids[1])["Pid"], signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while engine.is_healthy():
            assert time.monotonic() < deadline, "the dead TP worker was not noticed"
            await asyncio.sleep(0.2)
        with pytest.raises(EngineDeadError):
            engine.add_request("late", [5, 6], None, GREEDY)
    finally:
        engine.shutdown()


def test_tp2_start_up_failure_is_raised_here(local_ray, config):
    """A placement group with too few bundles: the engine process' error, raised by the constructor."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}])
    try:
        assert ray.get(pg.ready(), timeout=WAIT_S)
        link = dataclasses.replace(RayLink.current(), placement_group=pg)
        with pytest.raises(ValueError, match="1 bundles"):
            EngineProcess(dataclasses.replace(config, tensor_parallel_size=2), ray_link=link)
    finally:
        remove_placement_group(pg)
    with pytest.raises(ValueError, match="no Ray link"):
        EngineProcess(config, ray_link=link)


@pytest.mark.gpu
def test_tp2_process_nccl_equals_tp1_on_two_gpus(local_ray, tiny_checkpoint):
    """On CUDA: the engine process drives two TPWorker actors (one GPU each, NCCL), fp32 greedy
    tokens == the in-process TP=1 engine's."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    config = EngineConfig(model=str(tiny_checkpoint("qwen3_vl")), dtype="float32", device="cuda",
                          max_model_len=512, num_gpu_blocks=64, max_num_seqs=8)

    async def tokens(engine) -> list[list[int]]:
        return [[t for o in await _drain(s) for t in o.new_token_ids] for s in engine.add_requests(_requests(config))]

    one = Engine(config)
    try:
        want = asyncio.run(tokens(one))
    finally:
        one.shutdown()
    two = EngineProcess(dataclasses.replace(config, tensor_parallel_size=2))
    try:
        assert asyncio.run(tokens(two)) == want and two.is_healthy() and len(two.worker_ids) == 2
    finally:
        two.shutdown()
