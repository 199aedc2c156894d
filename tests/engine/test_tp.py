"""TP=2 over gloo with two Ray actors equals TP=1; a killed worker fails requests, never hangs."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

ray = pytest.importorskip("ray")

from engine import LLM, SamplingParams  # noqa: E402
from engine.engine import Engine, EngineConfig  # noqa: E402
from tests.engine.helpers import TEXT, image, prompt_ids  # noqa: E402

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def local_ray():
    env = {k: v for k, v in os.environ.items() if k.startswith("SPLITVL_")}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    yield
    ray.shutdown()


def _tp2_matches_tp1(path, **kwargs) -> None:
    """Greedy tokens of text and two-image prompts: TP=2 over two worker actors == TP=1 in process."""
    with LLM(path, **kwargs) as one:
        tok = one.tokenizer
        prompts = [
            {"prompt_token_ids": prompt_ids(tok, TEXT, 0)},
            {"prompt_token_ids": prompt_ids(tok, TEXT, 2), "images": [image(96, 64, 1), image(64, 64, 2)]},
        ]
        ref = [o.token_ids for o in one.generate(prompts, GREEDY)]
    compiled = kwargs.pop("tp_compiled_graph", True)
    with LLM(path, tensor_parallel_size=2, tp_compiled_graph=compiled, **kwargs) as two:
        # The steps went where asked: the compiled graph (text steps) or actor tasks only.
        assert (two.engine.executor._dag is not None) == compiled
        got = [o.token_ids for o in two.generate(prompts, GREEDY)]
        assert two.engine.is_healthy()
    assert got == ref


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_tp2_equals_tp1(local_ray, tiny_checkpoint, arch):
    """Hybrid Qwen3.5 too: each rank keeps its heads' conv/recurrent state slots."""
    _tp2_matches_tp1(tiny_checkpoint(arch), max_model_len=512, num_gpu_blocks=64, max_num_seqs=8)


def test_tp2_over_actor_tasks_equals_tp1(local_ray, tiny_checkpoint):
    """The step path without the compiled graph (`tp_compiled_graph=False`) gives the same tokens."""
    _tp2_matches_tp1(tiny_checkpoint("qwen3_vl"), max_model_len=512, num_gpu_blocks=64, tp_compiled_graph=False)


def test_tp2_dummy_weights_without_checkpoint_files(local_ray, weightless_checkpoint):
    """load_format dummy in the worker actors: each rank draws its own shard, no safetensors read.
    Its numbers are not TP=1's (other random values), so only the run itself is checked."""
    with LLM(weightless_checkpoint("qwen3_5_moe"), tensor_parallel_size=2, load_format="dummy", max_model_len=512, num_gpu_blocks=64) as two:
        prompts = [{"prompt_token_ids": prompt_ids(two.tokenizer, TEXT, 0)},
                   {"prompt_token_ids": prompt_ids(two.tokenizer, TEXT, 1), "images": [image(64, 64, 3)]}]
        outs = two.generate(prompts, GREEDY)
        assert two.engine.is_healthy()
    assert [len(o.token_ids) for o in outs] == [GREEDY.max_tokens] * 2


async def test_killed_worker_fails_requests(local_ray, tiny_checkpoint):
    path = tiny_checkpoint("qwen3_vl")
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", tensor_parallel_size=2,
                                 max_model_len=512, num_gpu_blocks=64, step_timeout_s=30))
    try:
        stream = engine.add_request("a", list(range(10, 30)), None,
                                    SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        first = await stream.__anext__()
        assert first.finish_reason is None
        ray.kill(engine.executor.workers[1])
        start = time.monotonic()

        async def drain():
            return [o async for o in stream]

        outs = await asyncio.wait_for(drain(), timeout=20)
        assert outs[-1].finish_reason == "error" and outs[-1].error
        assert not engine.is_healthy()
        assert time.monotonic() - start < 20
        from engine import EngineDeadError

        with pytest.raises(EngineDeadError):
            engine.add_request("b", [1, 2, 3], None, GREEDY)
    finally:
        engine.shutdown()


async def test_killed_idle_worker_is_noticed(local_ray, tiny_checkpoint):
    path = tiny_checkpoint("qwen3_vl")
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device="cpu", tensor_parallel_size=2,
                                 max_model_len=512, num_gpu_blocks=64))
    try:
        assert engine.is_healthy()
        ray.kill(engine.executor.workers[0])
        deadline = time.monotonic() + 10
        while engine.is_healthy() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not engine.is_healthy()
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_tp2_nccl_equals_tp1_on_two_gpus(local_ray, tiny_checkpoint, arch):
    """The same comparison on CUDA: two TPWorker actors on two GPUs talking NCCL, fp32."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _tp2_matches_tp1(tiny_checkpoint(arch), device="cuda", dtype="float32", max_model_len=512, num_gpu_blocks=64)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_tp2_custom_all_reduce_equals_nccl_on_two_gpus(local_ray, tiny_checkpoint, arch):
    """bf16 TP=2 (CUDA graphs on): the one-shot CUDA IPC all-reduce gives NCCL's greedy tokens
    (two ranks: both round a + b once), and it is really in use on every rank."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    path = tiny_checkpoint(arch)
    kw = dict(device="cuda", dtype="bfloat16", tensor_parallel_size=2, max_model_len=512, num_gpu_blocks=64)
    results, graphed = {}, {}
    for custom in (False, True):
        with LLM(path, custom_all_reduce=custom, **kw) as two:
            prompts = [{"prompt_token_ids": prompt_ids(two.tokenizer, TEXT, i)} for i in range(3)]
            prompts.append({"prompt_token_ids": prompt_ids(two.tokenizer, TEXT, 3), "images": [image(96, 64, 1)]})
            state = ray.get([w.__ray_call__.remote(lambda self: (self.custom_ar is not None,
                                                                 self.runner.graphs is not None))
                             for w in two.engine.executor.workers])
            assert [active for active, _ in state] == [custom, custom]
            graphed[custom] = [g for _, g in state]
            results[custom] = [o.token_ids for o in two.generate(prompts, GREEDY)]
            assert two.engine.is_healthy()
    assert results[True] == results[False]
    # The decode steps replayed CUDA graphs with the kernel captured in them (dense model: always).
    assert graphed[True] == graphed[False] and (arch != "qwen3_vl" or all(graphed[True]))
