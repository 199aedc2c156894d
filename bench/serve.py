"""Serving: image-chat load over the OpenAI HTTP endpoint, concurrency sweep, two GPU layouts.

    # start the app in this process on a random-weight checkpoint, both layouts (2 GPUs):
    python -m bench.serve --model qwen3-vl-8b --layout one-gpu split --json $OUT/serve.json
    # the engine step's token budget (llm.max_num_batched_tokens), one run per value:
    python -m bench.serve --model qwen3-vl-8b --layout one-gpu-colocated-process --load-format dummy --no-hf \
        --concurrency 1,64 --step-tokens 512 1024 4096
    # against a running server (`serve run configs/...yaml`):
    python -m bench.serve --url http://127.0.0.1:8000 --model-id Qwen/Qwen3-VL-8B-Instruct
    # a shape whose checkpoint would not fit the disk: random weights made in the replicas
    python -m bench.serve --model qwen3-vl-30b-a3b --layout one-gpu --load-format dummy --no-hf
    # CPU smoke (tiny checkpoint, a few seconds):
    python -m bench.serve --tiny qwen3_vl --config configs/bench/serve-cpu-smoke.yaml \
        --concurrency 1 2 --image-size 64 --output-len 8 --no-hf --transfer-iters 2

Workload (bench/load.py): one `--image-size`^2 JPEG per request (distinct, so
the embedding cache never hits), a short question, `--output-len` tokens with
`ignore_eos`, streamed; `max(--min-requests, 2 x concurrency)` requests per
level. Reports output tok/s, requests/s, TTFT, TPOT and inter-chunk latency
(p50/p99) and errors per level. The clients run in `--client-procs` processes
(bench/load_procs.py; default one per 16 streams), so that one client's event
loop does not time its own lag as the server's.

Serving overhead, from the app's `/metrics` (histogram deltas around each
level; the LLM replica records `splitvl_engine_time_to_first_token_seconds`,
add_request -> first token, and `splitvl_llm_embedding_wait_seconds`):
- `ray overhead` = text-only requests (1 output token, concurrency 1): HTTP
  TTFT - the engine's own TTFT; ingress, router (tokenize, detokenize) and the
  Serve hops there and back;
  split by where it happens (`overhead_breakdown`, means): outside the
  ingress (client, proxy, the hop to the ingress replica), the ingress' body
  read, the router's preprocessing, the LLM call's Serve hops (router-measured
  round trip less the LLM replica's own time), the engine TTFT, the rest;
- per image level, `other ms` = mean HTTP TTFT - mean engine TTFT - mean LLM
  embedding wait: the above plus image decode and preprocessing in the router.
Per level, the LLM replica's step timeline and the vision replica's tower calls
(bench/timeline.py): steps/s, rows and prefill tokens per step, host ms per phase,
idle share, vision overlap, mixed vs pure-decode steps; raw records in the JSON
(`levels[i].timeline`; not with --url).
Embedding transfer (bench/transfer.py): one image's embeddings between two
actors placed as the layout places the encoder and the LLM.
Baselines in the same run: transformers `generate(max_new_tokens=1)` on the same
image request in this process (bench/ttft.py), and optionally our engine.LLM.

Layouts are `configs/bench/serve-<layout>.yaml` (`--config` for other YAMLs);
Ray is started with 1 GPU for the one-gpu layouts (so fractional shares
land on one card) and 2 for split; one-gpu-colocated is one-gpu with
`llm.colocate_ingress` (the ingress replica owns the engine: no Serve hop per token);
tp2 runs the LLM at tensor_parallel_size 2 on 0.6 of each of 2 GPUs, the vision encoder on 0.2 of one;
the `-process` layouts add `llm.engine_process` (the engine in a process of its own);
one-gpu-colocated-vision adds `vision.colocate_llm` to one-gpu-colocated (the tower in the ingress replica
that owns the engine, on a CUDA stream of its own; no vision deployment, no embedding transfer);
one-gpu-colocated-vision-process adds `llm.engine_process` to that (engine and tower in the engine process).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from bench.common import int_list, print_table, write_json
from bench.load import chat_body, make_image_url, run_level, scrape, summarize
from bench.load_procs import default_procs, run_level_procs
from bench.timeline import TimelineSource, print_timeline

REPO = Path(__file__).resolve().parents[1]
LAYOUT_GPUS = {"one-gpu": 1, "one-gpu-colocated": 1, "one-gpu-process": 1, "one-gpu-colocated-process": 1,
               "one-gpu-colocated-vision": 1, "one-gpu-colocated-vision-process": 1, "split": 2, "tp2": 2, "tp2-process": 2}
TRANSFER_GPUS = {"one-gpu": (0.5, 0.5), "one-gpu-colocated": (0.5, 0.5), "one-gpu-process": (0.5, 0.5),
                 "one-gpu-colocated-process": (0.5, 0.5), "split": (1.0, 1.0), "tp2": (1.0, 1.0),
                 "tp2-process": (1.0, 1.0)}
ENGINE_TTFT = "splitvl_engine_time_to_first_token_seconds"
EMBED_WAIT = "splitvl_llm_embedding_wait_seconds"
VISION_ENCODE = "splitvl_vision_encode_seconds"
BODY_READ = "splitvl_ingress_body_read_seconds"
INGRESS_FIRST_CHUNK = "splitvl_ingress_time_to_first_chunk_seconds"
ROUTER_PREPROCESS = "splitvl_router_preprocess_seconds"
LLM_CALL = "splitvl_llm_call_overhead_seconds"
OVERHEAD_PARTS = (BODY_READ, INGRESS_FIRST_CHUNK, ROUTER_PREPROCESS, LLM_CALL)


def layout_args(config_file: Path, ckpt: Path, model_id: str, load_format: str = "auto") -> dict:
    """The app args of a layout YAML, pointed at `ckpt`; `load_format` "dummy" goes into its
    `llm` and `vision` sections (the YAML's own setting stays otherwise)."""
    import yaml

    from deployments.config import args_from_serve_yaml

    args = {**args_from_serve_yaml(yaml.safe_load(config_file.read_text()) or {}), "model": str(ckpt),
            "model_id": model_id}
    if load_format != "auto":
        for section in ("llm", "vision"):
            args[section] = {**(args.get(section) or {}), "load_format": load_format}
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_gpus: int | None, serve_env: dict[str, str] | None = None) -> bool:
    """Start a local Ray instance unless one is up (tests share theirs). Returns whether it did.

    `serve_env`: variables for every process of the cluster (e.g. Ray Serve's own switches,
    `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`), read when each process imports Serve.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.update(serve_env or {})
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("SPLITVL_", "TORCH_CUDA_ARCH", "CUDA_HOME", "MAX_JOBS"))}
    env.update(serve_env or {})
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false")
    if num_gpus:
        # HAProxy as Serve's HTTP ingress (README "Serving performance"); read when the cluster
        # starts, so it goes into this process' environment, not a runtime_env. RAY_SERVE_ENABLE_HA_PROXY=0 opts out.
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    ray.init(num_gpus=num_gpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    return True


def start_app(args: dict) -> str:
    """serve.run the app on a free local port; returns its base URL once it answers."""
    import httpx
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app did not answer at {url}")
        time.sleep(0.5)


def stop_app(owns_ray: bool) -> None:
    """Ends our local cluster (its processes exit and free their GPUs), else deletes the app.

    A graceful `serve.shutdown()` before `ray.shutdown()` adds seconds and nothing
    here; Serve notices the dead cluster and starts fresh in the next layout. In a cluster
    this process did not start, Serve is shut down (its proxy keeps the port it started on).
    """
    import ray
    from ray import serve

    if owns_ray:
        ray.shutdown()
    else:  # Serve too: the next layout starts its own proxy on its own port
        serve.shutdown()


async def settled_scrape(url: str, key: str | None, names: tuple[str, ...], timeout_s: float = 10.0) -> dict:
    """/metrics once the counts of `names` stop moving.

    Replicas push their metrics at most every 0.2 s, and a replica's first push
    waits for the metrics hub actor to exist: a fixed pause can miss the last
    phase's values, which would then land in the next phase's deltas.
    """
    deadline = time.monotonic() + timeout_s
    counts = None
    while True:
        await asyncio.sleep(0.5)
        sample = await scrape(url, key)
        now = {n: sample[n].count for n in names if n in sample}
        if now == counts or time.monotonic() > deadline:
            return sample
        counts = now


async def _metered(url: str, key: str | None, coro, names: tuple[str, ...]) -> tuple[object, dict]:
    """Run `coro` between two settled /metrics scrapes; histogram deltas of `names`."""
    before = await settled_scrape(url, key, names)
    out = await coro
    after = await settled_scrape(url, key, names)
    return out, {n: after[n].minus(before.get(n)) for n in names if n in after}


def _hist_ms(hists: dict, name: str) -> dict[str, float]:
    h = hists.get(name)
    if h is None or h.count == 0:
        return {"mean": math.nan, "p50": math.nan}
    return {"mean": h.mean * 1e3, "p50": h.quantile(0.5) * 1e3}


async def sweep(url: str, model_id: str, opts, image_seed: int, app_name: str | None = None) -> dict:
    """Warm up, measure the text-only overhead, then every concurrency level.

    `app_name`: the Serve app started here, whose replicas' timelines are read per level.
    """
    timeline = TimelineSource.for_app(app_name) if app_name is not None else None
    key = opts.api_key
    warm = [chat_body(model_id, make_image_url(opts.image_size, image_seed + i), 4) for i in range(opts.warmup)]
    if warm:  # CUDA graphs, lazy inits, the first vision batch
        await run_level(url, model_id, warm, concurrency=min(4, max(opts.concurrency)), api_key=key)
    image_seed += len(warm)

    probes = [chat_body(model_id, None, 1) for _ in range(opts.overhead_probes)]
    (res, wall), hists = await _metered(url, key, run_level(url, model_id, probes, 1, key),
                                        (ENGINE_TTFT, *OVERHEAD_PARTS))
    probe = summarize(res, wall, 1)
    engine = _hist_ms(hists, ENGINE_TTFT)
    overhead = {"http_ttft_p50_ms": probe["ttft_p50_ms"], "http_ttft_mean_ms": probe["ttft_mean_ms"],
                "engine_ttft_p50_ms": engine["p50"], "engine_ttft_mean_ms": engine["mean"],
                "ray_overhead_p50_ms": probe["ttft_p50_ms"] - engine["p50"],
                "ray_overhead_mean_ms": probe["ttft_mean_ms"] - engine["mean"], "errors": probe["errors"],
                "breakdown_mean_ms": overhead_breakdown(probe["ttft_mean_ms"], engine["mean"], hists)}

    levels = []
    for c in opts.concurrency:
        if time.monotonic() > opts.deadline:
            print(f"  c={c}: skipped, --time-budget-s spent", flush=True)
            continue
        n = max(opts.min_requests, 2 * c)
        bodies = [chat_body(model_id, make_image_url(opts.image_size, image_seed + i), opts.output_len)
                  for i in range(n)]
        image_seed += n
        if timeline is not None:
            await timeline.mark()
        procs = opts.client_procs or default_procs(c)
        load = run_level_procs(url, model_id, bodies, c, procs, key, ramp_s=opts.ramp_s)
        (res, wall), hists = await _metered(url, key, load, (ENGINE_TTFT, EMBED_WAIT, VISION_ENCODE, *OVERHEAD_PARTS))
        level = summarize(res, wall, c)
        level["client_procs"] = min(procs, c)
        if timeline is not None:
            level["timeline"] = await timeline.pull()
        engine, wait, vision = (_hist_ms(hists, n_) for n_ in (ENGINE_TTFT, EMBED_WAIT, VISION_ENCODE))
        level.update(engine_ttft_p50_ms=engine["p50"], engine_ttft_mean_ms=engine["mean"],
                     embed_wait_mean_ms=wait["mean"], vision_encode_mean_ms=vision["mean"],
                     other_mean_ms=level["ttft_mean_ms"] - engine["mean"] - wait["mean"],
                     # the LLM replica's own share is its embedding wait + engine TTFT
                     breakdown_mean_ms=overhead_breakdown(level["ttft_mean_ms"], engine["mean"] + wait["mean"], hists))
        levels.append(level)
        print(f"  c={c}: {level['output_tok_s']:.0f} tok/s, TTFT p50 {level['ttft_p50_ms']:.1f} ms, "
              f"TPOT p50 {level['tpot_p50_ms']:.2f} ms, errors {level['errors']}", flush=True)
    return {"overhead": overhead, "levels": levels}


def overhead_breakdown(http_ttft_ms: float, engine_ttft_ms: float, hists: dict) -> dict[str, float]:
    """Where the text-only TTFT goes, in means (they add up; medians do not).

    - outside the ingress: the client, the proxy and the Serve hop to the ingress replica and back;
    - body read: the ingress fetching the request body (from the proxy, over Ray);
    - router: template + tokenize up to the LLM call;
    - LLM call: the Serve call to the LLM replica and its first item back, less the replica's own time;
    - engine TTFT: add_request -> first token inside the LLM replica;
    - rest: the remainder inside the ingress (validation, the LLM replica's own work around the
      engine, detokenizing, the first SSE chunk).
    """
    part = {name: _hist_ms(hists, name)["mean"] for name in OVERHEAD_PARTS}
    in_ingress = part[INGRESS_FIRST_CHUNK]
    out = {
        "outside_ingress": http_ttft_ms - in_ingress,
        "body_read": part[BODY_READ],
        "router": part[ROUTER_PREPROCESS],
        "llm_call": part[LLM_CALL],
        "engine_ttft": engine_ttft_ms,
    }
    out["rest"] = in_ingress - out["body_read"] - out["router"] - out["llm_call"] - engine_ttft_ms
    return out


def model_checkpoint(opts) -> tuple[Path, bool]:
    """(checkpoint dir, whether this run owns it and removes it). With `--load-format dummy`
    the directory holds no weights: config, tokenizer and preprocessor files only."""
    dummy = opts.load_format == "dummy"
    if opts.tiny:
        from bench.checkpoints import MARKER
        from models.tiny import write_tiny_checkpoint

        base = Path(opts.ckpt_cache) if opts.ckpt_cache else None
        name = f"tiny-{opts.tiny}" + ("-dummy" if dummy else "")
        out = (base / name) if base else Path(__import__("tempfile").mkdtemp(prefix="splitvl-tiny-"))
        if not (out / MARKER).is_file():
            write_tiny_checkpoint(opts.tiny, out)
            if dummy:
                for weights in out.glob("*.safetensors*"):
                    weights.unlink()
            (out / MARKER).write_text("ok\n")
        return out, base is None
    from bench.checkpoints import prepare_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = prepare_checkpoint(opts.model, opts.ckpt_cache, torch.bfloat16, device, weights=not dummy)
    if device == "cuda":
        torch.cuda.empty_cache()  # the replicas size their KV cache from what this process leaves free
    return ckpt, opts.ckpt_cache is None


def transfer_row(ckpt: Path, layout: str, args: dict, iters: int) -> dict:
    from bench.transfer import embedding_shape, measure_transfer
    from deployments.config import resolve_dtype
    from models.config import load_model_config

    tokens, hidden, levels = embedding_shape(load_model_config(ckpt), args.get("image_size", 1024))
    gpus = TRANSFER_GPUS.get(layout, (0.0, 0.0)) if torch.cuda.is_available() else (0.0, 0.0)
    dtype = resolve_dtype(args["dtype"], "cuda" if gpus[0] > 0 else "cpu")
    return measure_transfer(tokens, hidden, levels, dtype, gpus, iters=iters)


def wait_for_free_gpus(timeout_s: float = 30.0) -> None:
    """Killed actors hand their GPU shares back asynchronously; wait for all of them."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("GPU", 0.0) < ray.cluster_resources().get("GPU", 0.0) - 1e-6:
        if time.monotonic() > deadline:
            raise RuntimeError("GPU shares of the transfer actors were not released")
        time.sleep(0.2)


def run_layout(name: str, config_file: Path, ckpt: Path, opts, step_tokens: int | None = None) -> dict:
    """One layout's sweep; `step_tokens`: its `llm.max_num_batched_tokens` instead of the YAML's
    (the run is then named `<layout>@<tokens>`)."""
    args = layout_args(config_file, ckpt, "bench", opts.load_format)
    if step_tokens is not None:
        args["llm"] = {**(args.get("llm") or {}), "max_num_batched_tokens": step_tokens}
    print(f"== layout {name}: {config_file.relative_to(REPO) if config_file.is_relative_to(REPO) else config_file}"
          + (f", llm.max_num_batched_tokens {step_tokens}" if step_tokens is not None else ""), flush=True)
    owns_ray = start_ray(LAYOUT_GPUS.get(name) if torch.cuda.is_available() else None, opts.serve_env)
    try:
        # Before the app: its replicas hold every GPU share the transfer actors would need. A tower in the
        # LLM replica (vision.colocate_llm) moves no embeddings.
        transfer = None if (args.get("vision") or {}).get("colocate_llm") else \
            transfer_row(ckpt, name, {**args, "image_size": opts.image_size}, opts.transfer_iters)
        wait_for_free_gpus()
        t0 = time.monotonic()
        url = start_app(args)
        startup_s = time.monotonic() - t0
        result = asyncio.run(sweep(url, "bench", opts, image_seed=0, app_name="bench"))
        result.update(layout=name if step_tokens is None else f"{name}@{step_tokens}", config=str(config_file),
                      startup_s=startup_s, transfer=transfer, step_tokens=step_tokens)
        return result
    finally:
        stop_app(owns_ray)


def baselines(ckpt: Path, opts) -> dict:
    from bench.ttft import hf_ttft_ms, ours_ttft_ms

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict[str, float] = {}
    if opts.hf and opts.load_format == "dummy":
        print("transformers in-process TTFT: skipped (--load-format dummy writes no weights)", flush=True)
    elif opts.hf:
        out["hf_ttft_ms"] = hf_ttft_ms(ckpt, opts.image_size, device, dtype, iters=opts.baseline_iters)
        print(f"transformers in-process TTFT: {out['hf_ttft_ms']:.1f} ms", flush=True)
    if opts.ours_inprocess:
        out["ours_inprocess_ttft_ms"] = ours_ttft_ms(
            ckpt, opts.image_size, device, str(dtype).removeprefix("torch."), iters=opts.baseline_iters,
            max_model_len=4096, num_gpu_blocks=512, load_format=opts.load_format)
        print(f"ours in-process TTFT: {out['ours_inprocess_ttft_ms']:.1f} ms", flush=True)
    return out


def print_tables(device: str, opts, runs: list[dict], base: dict) -> None:
    rows = []
    for run in runs:
        for lv in run["levels"]:
            rows.append([run["layout"], lv["concurrency"], lv["requests"], lv["errors"], lv["output_tok_s"],
                         lv["requests_s"], lv["ttft_p50_ms"], lv["ttft_p99_ms"], lv["tpot_p50_ms"],
                         lv["itl_p50_ms"], lv["itl_p99_ms"], lv["engine_ttft_p50_ms"], lv["embed_wait_mean_ms"],
                         lv["vision_encode_mean_ms"], lv["other_mean_ms"]])
    print_table(f"Image chat over HTTP, {opts.model or opts.tiny}, {opts.image_size}px image, "
                f"{opts.output_len} output tokens, {device}",
                ["layout", "conc", "reqs", "errors", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms",
                 "TPOT p50 ms", "ITL p50 ms", "ITL p99 ms", "engine TTFT p50 ms", "emb wait ms",
                 "vision ms", "other ms"], rows)
    print_timeline(runs)
    rows = []
    for run in runs:
        o, t = run["overhead"], run.get("transfer") or {}
        rows.append([run["layout"], o["ray_overhead_p50_ms"], o["ray_overhead_mean_ms"], o["http_ttft_p50_ms"],
                     o["engine_ttft_p50_ms"], t.get("bytes", math.nan) / 1e6, t.get("get_gb_s", math.nan),
                     t.get("end_to_end_gb_s", math.nan), run.get("startup_s", math.nan)])
    print_table("Serving overhead (text-only, 1 token, concurrency 1) and embedding transfer (one image)",
                ["layout", "ray overhead p50 ms", "ray overhead mean ms", "HTTP TTFT p50 ms",
                 "engine TTFT p50 ms", "embeds MB", "object store GB/s", "end to end GB/s", "startup s"], rows)
    parts = ("outside_ingress", "body_read", "router", "llm_call", "engine_ttft", "rest")
    rows = [[run["layout"], run["overhead"]["http_ttft_mean_ms"],
             *(run["overhead"].get("breakdown_mean_ms", {}).get(k, math.nan) for k in parts)] for run in runs]
    print_table("Where the text-only TTFT goes (means, ms; see bench.serve.overhead_breakdown)",
                ["layout", "HTTP TTFT", "outside ingress (client, proxy, hop)", "body read", "router",
                 "LLM call hops", "engine TTFT", "rest in ingress"], rows)
    rows = [[run["layout"], lv["concurrency"], lv["ttft_mean_ms"],
             *(lv.get("breakdown_mean_ms", {}).get(k, math.nan) for k in parts)]
            for run in runs for lv in run["levels"]]
    print_table("Where the image-chat TTFT goes (means, ms; router = decode, hash, resize, encode call; "
                "LLM replica = embedding wait + engine TTFT)",
                ["layout", "conc", "HTTP TTFT", "outside ingress (client, proxy, hop)", "body read", "router",
                 "LLM call hops", "LLM replica", "rest in ingress"], rows)
    rows = [[f"ours HTTP, {run['layout']}, concurrency 1", lv["ttft_p50_ms"]]
            for run in runs for lv in run["levels"] if lv["concurrency"] == 1]
    if "ours_inprocess_ttft_ms" in base:
        rows.append(["ours in-process (engine.LLM)", base["ours_inprocess_ttft_ms"]])
    if "hf_ttft_ms" in base:
        rows.append(["transformers in-process (generate, 1 token)", base["hf_ttft_ms"]])
    print_table(f"Time to first token, one {opts.image_size}x{opts.image_size} image request, {device}",
                ["system", "TTFT ms"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-vl-8b", help="configs/models/<name>.json architecture")
    parser.add_argument("--tiny", default=None, help="a models.tiny architecture instead (CPU smoke)")
    parser.add_argument("--ckpt", default=None, help="use this checkpoint directory (needs a tokenizer)")
    parser.add_argument("--ckpt-cache", default=None, help="keep/reuse random checkpoints here")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: write no weights (config, tokenizer, preprocessor files only); the replicas "
                             "make random weights in place (`load_format: dummy` in the layout's llm and vision)")
    parser.add_argument("--layout", nargs="+", default=["one-gpu"], choices=sorted(LAYOUT_GPUS))
    parser.add_argument("--config", nargs="+", default=None,
                        help="Serve YAMLs to run instead of the layouts, one after the other in this run")
    parser.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--model-id", default=None, help="served model name (with --url)")
    parser.add_argument("--api-key", default=os.environ.get("SPLITVL_API_KEY"))
    parser.add_argument("--concurrency", nargs="+", default=["1,8,32,64"])
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least")
    parser.add_argument("--client-procs", type=int, default=0,
                        help="load-generator processes per level (0: one per 16 streams, bench/load_procs.py)")
    parser.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment of every Ray process started here (Ray Serve switches)")
    parser.add_argument("--ramp-s", type=float, default=0.0,
                        help="spread each level's first requests over this many seconds (bench.load.Ramp; 0: at once)")
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=4, help="image requests before measuring")
    parser.add_argument("--overhead-probes", type=int, default=20)
    parser.add_argument("--transfer-iters", type=int, default=10)
    parser.add_argument("--baseline-iters", type=int, default=5)
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers TTFT")
    parser.add_argument("--ours-inprocess", action="store_true", help="also time engine.LLM in-process")
    parser.add_argument("--step-tokens", nargs="+", default=None,
                        help="run each layout once per llm.max_num_batched_tokens value (the engine step's token "
                             "budget), e.g. 512 4096; runs are named <layout>@<tokens>")
    parser.add_argument("--time-budget-s", type=float, default=math.inf,
                        help="start no layout or level after this many seconds (the table still prints)")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    opts.deadline = time.monotonic() + opts.time_budget_s
    opts.concurrency = int_list(opts.concurrency)
    opts.step_tokens = int_list(opts.step_tokens) if opts.step_tokens else None
    if any("=" not in item for item in opts.serve_env):
        parser.error("--serve-env takes KEY=VALUE items")
    opts.serve_env = dict(item.split("=", 1) for item in opts.serve_env)
    if opts.tiny:
        opts.model = None
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    runs: list[dict] = []
    ckpt, owned = (Path(opts.ckpt), False) if opts.ckpt else (None, False)
    if opts.url is None and ckpt is None:
        ckpt, owned = model_checkpoint(opts)
    payload: dict = {"device": device, "model": opts.model or opts.tiny, "image_size": opts.image_size,
                     "output_len": opts.output_len, "runs": runs}
    try:
        base = baselines(ckpt, opts) if ckpt is not None else {}
        payload["baselines"] = base
        if opts.url is not None:
            model_id = opts.model_id or "bench"
            result = asyncio.run(sweep(opts.url, model_id, opts, image_seed=int(time.time())))
            runs.append({**result, "layout": "url", "config": opts.url})
        else:
            configs = ([(Path(c).stem, Path(c)) for c in opts.config] if opts.config else
                       [(name, REPO / "configs" / "bench" / f"serve-{name}.yaml") for name in opts.layout])
            for (name, config_file), step_tokens in itertools.product(configs, opts.step_tokens or [None]):
                if time.monotonic() > opts.deadline:
                    print(f"== layout {name}: skipped, --time-budget-s spent", flush=True)
                    continue
                runs.append(run_layout(name, config_file, ckpt, opts, step_tokens))
                write_json(opts.json, payload)
        write_json(opts.json, payload)
        print_tables(device, opts, runs, base)
    finally:
        if owned and ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
    return payload


if __name__ == "__main__":
    main()
