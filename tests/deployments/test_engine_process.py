"""`llm.engine_process`: the engine in a process of its own, behind the same Serve app.

Apps on one Serve instance, real engine on the tiny Qwen3-VL: "inproc" (colocated ingress,
engine in the replica), "proc" (colocated, engine process), "proc-llm" (the LLMServer
deployment, engine process) and "proc-tp" (the LLMServer deployment, engine process driving
two TP worker actors over gloo in the replica's placement group). Greedy chats over HTTP with
the official client must be the in-process app's, images included; killing the engine process restarts the replica that
spawned it. A unit test runs the engine process' deferred image path without Ray.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.deployments.conftest import wait_until
from tests.deployments.helpers import data_url, png_bytes, run_tiny_app, stream_in_background, tiny_checkpoint_fixture

HANG_GUARD_S = 120.0
ckpt = tiny_checkpoint_fixture("qwen3_vl")
IMAGE_BODY = {"max_tokens": 12, "extra_body": {"ignore_eos": True},
              "messages": [{"role": "user", "content": [
                  {"type": "image_url", "image_url": {"url": data_url(png_bytes(80, 56, (20, 120, 200)))}},
                  {"type": "text", "text": "Describe it."}]}]}
TEXT_BODY = {"max_tokens": 10, "messages": [{"role": "user", "content": "Describe the weather tomorrow."}]}


@pytest.fixture(scope="module")
def urls(serve_instance, ckpt):
    llm = {"max_model_len": 512, "num_gpu_blocks": 96, "max_num_seqs": 8}
    return {
        "inproc": run_tiny_app(serve_instance, ckpt, "inproc", {**llm, "colocate_ingress": True}),
        "proc": run_tiny_app(serve_instance, ckpt, "proc", {**llm, "colocate_ingress": True, "engine_process": True}),
        "proc-llm": run_tiny_app(serve_instance, ckpt, "proc-llm", {**llm, "engine_process": True}),
        "proc-tp": run_tiny_app(serve_instance, ckpt, "proc-tp", {**llm, "engine_process": True,
                                                                  "tensor_parallel_size": 2}),
    }


def _chat(url: str, app: str, stream: bool, **body) -> tuple[str, list[tuple[str, float]], str, int]:
    """(text, (token, logprob) per token, finish reason, completion tokens) of one greedy chat."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD_S)
    resp = client.chat.completions.create(model=app, temperature=0, logprobs=True, stream=stream, **body,
                                          **({"stream_options": {"include_usage": True}} if stream else {}))
    if not stream:
        choice = resp.choices[0]
        return (choice.message.content, [(t.token, t.logprob) for t in choice.logprobs.content],
                choice.finish_reason, resp.usage.completion_tokens)
    chunks = list(resp)
    parts = [c.choices[0] for c in chunks if c.choices]
    tokens = [(t.token, t.logprob) for p in parts if p.logprobs for t in p.logprobs.content]
    reason = next(p.finish_reason for p in reversed(parts) if p.finish_reason)
    return "".join(p.delta.content or "" for p in parts), tokens, reason, chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("app", ["proc", "proc-llm"])
@pytest.mark.parametrize("body", [IMAGE_BODY, TEXT_BODY], ids=["image", "text"])
def test_chat_equals_the_in_process_engine(urls, app, body):
    """Streamed and whole greedy chats (image through the vision replica) == the in-process app's."""
    for stream in (True, False):
        got = _chat(urls[app], app, stream, **body)
        want = _chat(urls["inproc"], "inproc", stream, **body)
        assert got[0] == want[0] and got[2:] == want[2:]
        assert [t for t, _ in got[1]] == [t for t, _ in want[1]]
        assert [lp for _, lp in got[1]] == pytest.approx([lp for _, lp in want[1]], abs=1e-5)
    if body is IMAGE_BODY:
        assert got[3] == 12


@pytest.mark.parametrize("body", [IMAGE_BODY, TEXT_BODY], ids=["image", "text"])
def test_tp2_engine_process_chat_equals_the_tp1_app(urls, body):
    """Streamed greedy chats of the TP=2 engine-process app == the TP=1 in-process app's tokens
    (logprobs to fp32 TP rounding: the ranks sum partial products in another order)."""
    got = _chat(urls["proc-tp"], "proc-tp", True, **body)
    want = _chat(urls["inproc"], "inproc", True, **body)
    assert got[0] == want[0] and got[2:] == want[2:]
    assert [t for t, _ in got[1]] == [t for t, _ in want[1]]
    assert [lp for _, lp in got[1]] == pytest.approx([lp for _, lp in want[1]], abs=1e-3)


def _pids_whose_cmdline_has(text: str, parent: int | None = None) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if text in cmdline and (parent is None or ppid == parent):
            out.append(int(entry.name))
    return out


def _engine_process(app: str) -> int | None:
    """The pid of the engine process the app's (one) ingress replica spawned."""
    replicas = _pids_whose_cmdline_has(f"ServeReplica:{app}:OpenAIIngress")
    children = [c for r in replicas for c in _pids_whose_cmdline_has("spawn_main", parent=r)]
    return children[0] if len(children) == 1 else None


def test_killed_engine_process_restarts_the_replica(urls):
    """SIGKILL the "proc" app's engine process: the stream in flight ends with an in-band error, requests
    get 503 until Serve (check_health) replaces the replica, which answers as before."""
    url = urls["proc"]
    body = {"model": "proc", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}
    first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=HANG_GUARD_S)
    assert first.status_code == 200, first.text
    victim = wait_until(lambda: _engine_process("proc"))
    streaming = {**body, "max_tokens": 400, "ignore_eos": True, "stream": True}
    reader, started, lines = stream_in_background(url, streaming, HANG_GUARD_S)
    assert started.wait(HANG_GUARD_S)
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    reader.join(HANG_GUARD_S)
    assert not reader.is_alive(), "the in-flight stream hung after the engine process died"
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "error" in events[-1] and events[-1]["error"]["message"], events[-1]
    statuses = []
    while True:
        assert time.monotonic() - t_kill < HANG_GUARD_S, f"no recovery: {statuses}"
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60.0)
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            break
        assert resp.status_code == 503, resp.text
        time.sleep(0.25)
    assert resp.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    replacement = wait_until(lambda: _engine_process("proc"))
    assert replacement != victim
    print(f"\n[recovery] engine process kill: first success {time.monotonic() - t_kill:.2f}s after the kill "
          f"({len(statuses) - 1} answered 503 meanwhile)")


def test_pending_images_are_read_in_the_engine_process(ckpt):
    """Object-store embeddings forwarded unread (`PendingImages`) and read by the engine process'
    `EmbeddingOpener` (shared memory, not a pickled copy) == the same embeddings merged in process."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (the tensor reductions)

    from deployments.embedding_transfer import ImageEmbedding, IpcEmbedding, PoolAddress
    from deployments.image_inputs import EmbeddingOpener, PendingImages, merge_images
    from engine import EngineInputError, SamplingParams
    from engine.core import EngineProcess
    from engine.engine import Engine, EngineConfig
    from models.config import load_model_config

    mc = load_model_config(ckpt)
    merge, hidden = mc.vision.spatial_merge_size, mc.text.hidden_size
    levels = len(mc.vision.deepstack_visual_indexes)
    gen = torch.Generator().manual_seed(0)
    grids = [(1, 4, 4), (1, 4, 8)]
    images = [ImageEmbedding(torch.randn(n, hidden, generator=gen), torch.randn(levels, n, hidden, generator=gen), g)
              for g in grids for n in [g[0] * g[1] * g[2] // merge**2]]
    pad, start = mc.image_token_id, mc.vision_start_token_id
    ids = [11, start] + [pad] * images[0].num_tokens + [start + 1, 12, start] + [pad] * images[1].num_tokens + \
        [start + 1, 13]
    pending = PendingImages(tuple(images), None)
    payload = sum(i.embeds.nbytes + i.deepstack.nbytes for i in images)
    assert len(ForkingPickler.dumps(pending)) < payload / 4  # shared-memory handles, not the values
    config = EngineConfig(model=str(ckpt), dtype="float32", device="cpu", max_model_len=512, num_gpu_blocks=64)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def outputs(engine, mm) -> list:
        async def run():
            return [out async for out in engine.add_request("img", ids, mm, sp)]
        return await asyncio.wait_for(run(), HANG_GUARD_S)

    async def tokens(engine, mm) -> list[int]:
        return [t for out in await outputs(engine, mm) for t in out.new_token_ids]

    engine = Engine(config)
    try:
        want = asyncio.run(tokens(engine, merge_images(images)))
    finally:
        engine.shutdown()
    process = EngineProcess(config, open_inputs=EmbeddingOpener("", "cpu"))
    try:
        assert asyncio.run(tokens(process, pending)) == want and len(want) == 8
        # Validated in this process, on the placeholder's shapes: nothing reaches the engine.
        with pytest.raises(EngineInputError, match="placeholder"):
            process.add_request("bad", ids, PendingImages((images[0],), None), sp)  # one image for two
        wide = ImageEmbedding(torch.zeros(4, hidden + 1), torch.zeros(levels, 4, hidden + 1), grids[0])
        with pytest.raises(EngineInputError, match="image_embeds"):
            process.add_request("bad", ids[:ids.index(start + 1) + 1], PendingImages((wide,), None), sp)
        assert process.stats()["num_waiting"] == 0
        # A handle the engine process cannot open ends that request with an error, the engine healthy
        # (LLMServer then raises EncoderUnavailableError: the router re-encodes via the object store).
        unreadable = IpcEmbedding(PoolAddress("splitvl-no-such-pool", "", "GPU-none", ()), 0, 1, 0,
                                  tuple(images[0].embeds.shape), tuple(images[0].deepstack.shape), "float32",
                                  grids[0])
        outs = asyncio.run(outputs(process, PendingImages((unreadable, images[1]), None)))
        assert [o.finish_reason for o in outs] == ["error"] and "another device" in outs[0].error
        assert process.is_healthy() and asyncio.run(tokens(process, pending)) == want
    finally:
        process.shutdown()


def test_engine_process_takes_any_tp_size(ckpt):
    """The config accepts TP 2 with the engine process; its replica still gets one bundle per rank."""
    from deployments.config import AppConfig
    from deployments.llm import LLMServer

    base = {"model": str(ckpt), "device": "cpu"}
    assert AppConfig.model_validate({**base, "llm": {"engine_process": True}}).llm.engine_process
    tp2 = AppConfig.model_validate({**base, "llm": {"engine_process": True, "tensor_parallel_size": 2,
                                                    "num_cpus": 0.5}})
    opts = LLMServer.deployment_options(tp2)
    assert opts["placement_group_bundles"] == [{"CPU": 1.5}, {"CPU": 1.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"


def test_gauges_reach_their_final_values_without_querying_the_engine_process(ckpt):
    """`_record_stats` reads the engine process' snapshot (no blocking `stats()` round trip on the
    event loop): after one finished and one aborted request the gauges still settle to idle."""
    from deployments.llm import STATS_SETTLE_S, LLMServer
    from engine import SamplingParams

    server = LLMServer({"model": str(ckpt), "device": "cpu", "dtype": "float32",
                        "llm": {"engine_process": True, "max_model_len": 512, "num_gpu_blocks": 64}})
    engine = server.engine

    def refuse():
        raise AssertionError("the metrics path asked the engine process for its stats")

    async def run() -> dict[str, float]:
        long = server.generate("long", list(range(10, 40)), SamplingParams(max_tokens=300, temperature=0,
                                                                           ignore_eos=True))
        first = await long.__anext__()  # running now; closing the stream below aborts it
        short = [d async for d in server.generate("short", list(range(20, 45)),
                                                  SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
        assert first.finish_reason is None and short[-1].finish_reason == "length"
        await long.aclose()
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            gauges = {name: value for name, _, value in server.metrics.snapshot()["gauges"]}
            if gauges.get("splitvl_num_requests_running") == 0 and gauges.get("splitvl_kv_cache_usage") == 0:
                return gauges
            assert time.monotonic() < deadline, gauges
            await asyncio.sleep(STATS_SETTLE_S / 4)

    try:
        engine.stats = refuse
        gauges = asyncio.run(run())
        assert gauges["splitvl_num_requests_waiting"] == 0
        del engine.stats
        assert engine.latest_stats() == engine.stats()  # idle: the snapshot is the exact answer
    finally:
        engine.shutdown()
