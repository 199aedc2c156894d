"""Backpressure, request timeouts and faults of a running Serve app, over real HTTP (issue 8).

One Ray cluster for the module (8 logical CPUs, dashboard on for the state API);
each test deploys its own small app under its own route and deletes it after.
The scripted engine stands in for the model where the test is about Serve
plumbing; the TP-worker test runs the real engine (TP=2 over gloo). Every wait
is bounded (client timeouts, `asyncio.wait_for`, `wait_until`): a hang fails
the test instead of stalling CI. Fault tests print their recovery times.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.deployments.conftest import local_serve, wait_until
from tests.deployments.helpers import data_url, png_bytes, stream_in_background
from tests.deployments.scripted_engine import GatedScriptedEngine, ScriptedEngine, SlowScriptedEngine, gate_path

HANG_GUARD_S = 120.0  # no single wait in this module may take longer


@pytest.fixture(scope="module")
def cluster():
    with local_serve(num_cpus=8, include_dashboard=True) as url:
        yield url


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("qwen3_vl")


@pytest.fixture
def deploy(cluster, ckpt):
    """`deploy(name, args, engine_cls=None) -> base URL`; the app is deleted after the test."""
    from ray import serve

    from deployments.app import bind_app
    from deployments.config import AppConfig

    names: list[str] = []

    def run(name: str, args: dict, engine_cls: type | None = None) -> str:
        full = {"model": str(ckpt), "model_id": name, "device": "cpu", "dtype": "float32", **args}
        serve.run(bind_app(AppConfig.model_validate(full), engine_cls=engine_cls), name=name,
                  route_prefix=f"/{name}")
        names.append(name)
        return f"{cluster}/{name}"

    yield run
    for name in names:
        if name in serve.status().applications:
            serve.delete(name)


def text_app(**llm) -> dict:
    return {"disable_vision_encoder": True,
            "llm": {"num_replicas": 1, "num_cpus": 0.1, "max_model_len": 512, **llm},
            "limits": {"max_tokens_limit": 256}}


def hello(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "messages": [{"role": "user", "content": "Tell me a long story."}]}


def assert_envelope(body: dict, status: int, response: httpx.Response) -> dict:
    assert response.status_code == status, response.text
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in response.text
    return body["error"]


def replica_names(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


# ---------------------------------------------------------------- backpressure and time


@pytest.mark.parametrize("colocate", [False, True], ids=["llm-deployment", "colocated"])
def test_overload_is_refused_with_503_and_retry_after(deploy, ckpt, colocate):
    """1 ongoing + 1 queued fit the LLM (its deployment's Serve queue, or the colocated ingress' own
    bound); the rest of a burst gets the 503 envelope, none waits.

    The engine holds every request before its first token until the burst's refusals are back (the
    gate file), so the running one cannot finish and free its place while a slow machine is still
    delivering the burst."""
    from ray import serve

    from deployments.app import engine_deployment

    app = "bp-colo" if colocate else "bp"  # a fresh route each: HAProxy may still hold the last app's
    url = deploy(app, text_app(max_ongoing_requests=1, max_queued_requests=1, colocate_ingress=colocate),
                 GatedScriptedEngine)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD_S)

    async def one(stream: bool):
        try:
            if stream:
                chunks = [c async for c in await client.chat.completions.create(
                    model=app, stream=True, **hello(20))]
                return "ok", [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            resp = await client.chat.completions.create(model=app, **hello(20))
            return "ok", resp.choices[0].finish_reason
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response

    # One running, at most one queued. Colocated, the bound is the ingress' own and exact. Through the
    # LLM deployment it is Serve's per-caller `max_queued_requests` (alpha), which with the engine held
    # let a third request in at the margin in about one gated run in ten (a request between its
    # replica probe and the queue is counted in neither): allowed here, the engine's own bound below is
    # strict.
    most = 2 if colocate else 3

    async def burst():
        tasks = [asyncio.ensure_future(one(i % 2 == 0)) for i in range(8)]
        deadline = time.monotonic() + HANG_GUARD_S / 2
        while sum(t.done() for t in tasks) < 8 - most and time.monotonic() < deadline:  # the refusals, or a bug
            await asyncio.sleep(0.05)
        gate.unlink()
        return await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S)

    gate = gate_path(ckpt)
    gate.touch()
    try:
        results = asyncio.run(burst())
    finally:
        gate.unlink(missing_ok=True)
    ok = [r for r in results if r[0] == "ok"]
    refused = [(i, r) for i, r in enumerate(results) if r[0] != "ok"]
    assert 1 <= len(ok) <= most, results
    assert all(reason == "length" for _, reason in ok)
    assert len(refused) >= 8 - most
    assert {i % 2 for i, _ in refused} == {0, 1}  # streaming and non-streaming requests alike
    for _, (status, response) in refused:
        assert response.headers.get("content-type", "").startswith("application/json"), (response.status_code, response.text[:300])
        error = assert_envelope(response.json(), 503, response)
        assert error["code"] == "overloaded" and error["type"] == "service_unavailable_error"
        assert int(response.headers["retry-after"]) >= 1
    stats = serve.get_deployment_handle(engine_deployment(app), app).stats.remote().result()
    # The engine never held more than max_ongoing_requests. Colocated, the next request is admitted the
    # moment the last one's final delta reaches its stream, which can be one step (async scheduling)
    # before the engine retires that sequence: one more may overlap it there.
    assert stats["max_running"] <= (2 if colocate else 1)
    # Still serving once the burst is over.
    resp = httpx.post(f"{url}/v1/chat/completions", json={"model": app, **hello(2)}, timeout=HANG_GUARD_S)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length"


def test_request_timeout_gives_408_and_aborts(deploy):
    from ray import serve

    app = text_app()
    app["limits"]["request_timeout_s"] = 1.0
    url = deploy("slow", app, SlowScriptedEngine)  # 60 tokens at 10/s: far past the 1 s limit
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD_S)
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="slow", **hello(60))
    took = time.monotonic() - start
    error = assert_envelope(info.value.response.json(), 408, info.value.response)
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert took < 30.0, took  # hang guard: answered near the 1 s limit, not after the 6 s generation
    # Streaming: headers are out when the limit hits, so the error arrives in-band, then [DONE].
    body = {"model": "slow", "stream": True, **hello(60)}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=HANG_GUARD_S) as resp:
        assert resp.status_code == 200
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "request_timeout" and set(last["error"]) == {"message", "type", "param", "code"}
    assert 1 <= len(events) - 3 < 60  # some tokens streamed, far from all
    handle = serve.get_deployment_handle("LLMServer", "slow")
    stats = wait_until(lambda: (s := handle.stats.remote().result())["num_running"] == 0 and s)
    # Every request that reached the engine was aborted there, none ran to its end. (Under load
    # the non-streamed one can time out in the router before the engine ever sees it.)
    assert stats["requests"] and sorted(stats["aborted"]) == sorted(stats["requests"])


# ---------------------------------------------------------------- faults


def test_vision_replica_killed_under_load(deploy):
    """Kill one of two vision replicas mid-load: requests finish (encode retried) or get a clean 503."""
    import ray

    # A batch waits 1 s for images that never make it full: each replica always holds encodes in flight.
    url = deploy("vf", {
        "vision": {"num_replicas": 2, "num_cpus": 0.1, "max_batch_size": 16, "batch_wait_timeout_s": 1.0},
        "llm": {"num_replicas": 1, "num_cpus": 0.1, "max_model_len": 512},
    }, ScriptedEngine)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60.0)
    outcomes: list[tuple[float, float, object]] = []  # (start, end, "ok" | status | exception name)
    stop = asyncio.Event()
    counter = iter(range(10**6))

    async def worker():
        while not stop.is_set():
            i = next(counter)
            image = data_url(png_bytes(32 + 16 * (i % 3), 32, (i % 251, (i // 251) % 251, 77)))
            started = time.monotonic()
            try:
                stream = await client.chat.completions.create(
                    model="vf", stream=True, max_tokens=4,
                    messages=[{"role": "user", "content": [{"type": "text", "text": f"Image {i}."},
                                                           {"type": "image_url", "image_url": {"url": image}}]}])
                reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
                outcome: object = "ok" if reasons[-1] == "length" else f"finish {reasons[-1]}"
            except openai.APIStatusError as exc:
                outcome = exc.status_code
                if exc.status_code == 503:
                    assert_envelope(exc.response.json(), 503, exc.response)
            except Exception as exc:  # a hang (client timeout) or a broken stream
                outcome = type(exc).__name__
            outcomes.append((started, time.monotonic(), outcome))

    async def scenario():
        workers = [asyncio.create_task(worker()) for _ in range(8)]
        await asyncio.sleep(0)
        while sum(o == "ok" for *_, o in outcomes) < 8:  # warm: both replicas have served
            await asyncio.sleep(0.2)
        # Successes come in bursts, when a batch finishes: the replicas are empty right then.
        # Half a second later the workers' next images sit in the replicas' 1 s batch wait,
        # so the victim dies holding encodes (the retry path below needs that).
        await asyncio.sleep(0.5)
        before = set(replica_names("vf", "VisionEncoder"))
        victim = sorted(before)[0]
        t_kill = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        deadline = t_kill + HANG_GUARD_S
        while not (set(replica_names("vf", "VisionEncoder")) - before and running_replicas("vf", "VisionEncoder") == 2):
            assert time.monotonic() < deadline, "the killed vision replica was not replaced"
            await asyncio.sleep(0.2)
        t_replaced = time.monotonic()
        while sum(o == "ok" and s > t_replaced for s, _, o in outcomes) < 8:
            assert time.monotonic() < deadline, "no successes after the replacement"
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 90.0)
        return victim, t_kill, t_replaced

    victim, t_kill, t_replaced = asyncio.run(scenario())
    bad = [o for *_, o in outcomes if o not in ("ok", 503)]
    assert not bad, bad  # finished or a clean 503: no 500, no hang, no torn stream
    in_flight = [o for s, e, o in outcomes if s < t_kill < e]
    after = [(e, o) for s, e, o in outcomes if s >= t_kill]
    first_ok = min(e for e, o in after if o == "ok")
    assert all(o == "ok" for s, _, o in outcomes if s >= t_replaced)
    retries = wait_until(lambda: _metric(httpx.get(f"{url}/metrics", timeout=10).text,
                                         "splitvl_vision_encode_retries_total"), timeout_s=30)
    print(f"\n[recovery] vision replica kill: {len(in_flight)} in flight "
          f"({in_flight.count('ok')} finished, {in_flight.count(503)} got 503), {retries:.0f} encode retries; "
          f"first new success {first_ok - t_kill:.2f}s after the kill; replacement RUNNING after "
          f"{t_replaced - t_kill:.2f}s; {len(outcomes)} requests in all")
    assert retries >= 1
    assert victim not in replica_names("vf", "VisionEncoder")


def _metric(text: str, name: str) -> float:
    from deployments.metrics import parse_prometheus

    return parse_prometheus(text).get(name, 0.0)


@pytest.mark.slow  # in the default run (and CI); deselect with -m 'not slow'
@pytest.mark.parametrize("colocate", [False, True], ids=["llm-deployment", "colocated"])
def test_tp_worker_killed_replica_restarts(deploy, colocate):
    """SIGKILL one TP rank of the LLM replica (colocated: of the ingress replica that owns the engine): 503s,
    check_health fails, Serve restarts the replica, requests succeed."""
    from ray.util.state import list_actors

    from deployments.app import engine_deployment

    url = deploy("tp", text_app(tensor_parallel_size=2, max_model_len=256, num_gpu_blocks=64, max_num_seqs=4,
                                colocate_ingress=colocate))
    owner = engine_deployment("tp")
    assert owner == ("OpenAIIngress" if colocate else "LLMServer")
    body = {"model": "tp", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}
    first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=HANG_GUARD_S)
    assert first.status_code == 200, first.text

    import ray

    gcs = ray.get_runtime_context().gcs_address  # other Ray instances may run on this machine

    def workers() -> list[int]:
        alive = list_actors(address=gcs, filters=[("class_name", "=", "TPWorker"), ("state", "=", "ALIVE")])
        return sorted(a.pid for a in alive)

    before_workers, before_replica = workers(), replica_names("tp", owner)
    assert len(before_workers) == 2 and len(before_replica) == 1

    # A stream in flight when the rank dies ends with an in-band error event and [DONE].
    streaming = {**body, "max_tokens": 200, "ignore_eos": True, "stream": True}
    reader, started, lines = stream_in_background(url, streaming, HANG_GUARD_S)
    assert started.wait(HANG_GUARD_S)
    t_kill = time.monotonic()
    os.kill(before_workers[1], signal.SIGKILL)  # a worker process this test's app started
    reader.join(HANG_GUARD_S)
    assert not reader.is_alive(), "the in-flight stream hung after the worker died"
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "error" in events[-1] and events[-1]["error"]["message"], events[-1]
    assert not [e for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]  # cut short, not done
    statuses: list[int] = []
    while True:
        assert time.monotonic() - t_kill < HANG_GUARD_S, f"no recovery: {statuses}"
        try:
            resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60.0)
        except httpx.HTTPError as exc:
            pytest.fail(f"request failed at the transport level: {exc!r}")
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            break
        error = assert_envelope(resp.json(), 503, resp)
        assert error["type"] == "service_unavailable_error"
        time.sleep(0.25)
    recovery = time.monotonic() - t_kill
    assert resp.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    after_replica = replica_names("tp", owner)
    assert len(after_replica) == 1 and after_replica != before_replica  # a new replica, not the old one
    after_workers = wait_until(lambda: len(w := workers()) == 2 and w)
    assert not set(after_workers) & set(before_workers)
    print(f"\n[recovery] TP worker kill: first success {recovery:.2f}s after the kill "
          f"({len(statuses) - 1} requests answered 503 meanwhile); the stream in flight ended with "
          f"{events[-1]['error']['message']!r}")


def test_graceful_shutdown_drains_a_running_stream(deploy):
    """serve.delete while a stream is running: the stream still completes, then the app is gone."""
    from ray import serve

    url = deploy("drain", text_app(), SlowScriptedEngine)
    body = {"model": "drain", "stream": True, "stream_options": {"include_usage": True}, **hello(30)}
    deleted: list[float] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=HANG_GUARD_S) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        events = [next(lines) for _ in range(3)]  # the stream is running
        t_delete = time.monotonic()
        deleter = threading.Thread(target=lambda: (serve.delete("drain"), deleted.append(time.monotonic())))
        deleter.start()
        events += list(lines)
        t_end = time.monotonic()
    deleter.join(HANG_GUARD_S)
    assert not deleter.is_alive() and deleted
    events = [e for e in events if e]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e and e != "data: [DONE]"]
    assert events[-1] == "data: [DONE]"
    assert not [c for c in chunks if "error" in c]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 30  # every token, none cut by the shutdown
    assert "drain" not in serve.status().applications
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 404
    print(f"\n[recovery] graceful shutdown: stream finished {t_end - t_delete:.2f}s after serve.delete; "
          f"delete returned after {deleted[0] - t_delete:.2f}s")
