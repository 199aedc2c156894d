"""Profile: where a decode step and the vision tower spend their time (host vs GPU kernels).

    python -m bench.profile --json $OUT/profile.json             # H100: Qwen3-VL-2B arch, random bf16 weights
    python -m bench.profile --batches 1,64 --ckpt-cache /tmp/ckpt --json $OUT/profile.json
    python -m bench.profile --model qwen3-vl-2b --batches --images 0 --ttft   # the 2B image TTFT only
    python -m bench.profile --smoke                               # CPU, tiny checkpoint

(a) Decode through our engine (`engine.LLM`, CUDA graphs on, as bench/decode.py
builds it): `batch` requests with 512-token prompts decode greedily; once every
request has its first tokens, a window of steps runs twice: first timed (wall
per step from one engine step to the next, and host time inside the phases of a
step), then under torch.profiler with CUDA activities. GPU busy = the union of
kernel and memcpy intervals in the profiled window, per step; busy / wall well
below 1 means the step is host-bound.
(b) Our vision tower on 8 images of 1024x1024 (a few calls after warmup).
(c) `--ttft`: one image request as the HTTP bench sends it (chat template, one
`--image-size` image, 1 output token) through `engine.LLM` in this process:
preprocessing, the tower and the whole request timed apart (medians), then one
profiled request: GPU busy vs wall, the engine's step phases, the top kernels.
What the whole request takes beyond preprocessing + tower is the engine's part
(prefill, first token); busy << wall there means host-bound.

Prints the top kernels by total time, GPU busy vs wall per step and the host
phase split, and writes all tables as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import ops
from bench.common import ATTN_SM90_HELP, attn_sm90_settings, int_list, print_table, synchronize, write_json
from engine.timeline import MARK, PHASE_FIELDS

PROMPT_LEN = 512
WARM_TOKENS = 4  # tokens every request has before the window (prefill and graph warmup done)
STEPS = 8  # decode steps per window
# Tokens each request may run past its window: the engine steps ahead of the consumer (a small batch
# would otherwise finish before the window opens); the requests are aborted when the window closes.
RUN_AHEAD = 256
SLACK_STEPS = 64  # extra decode steps a window may take to see its first engine steps
TOP = 15
# The engine's own phases of a step (engine.timeline.PHASE_FIELDS) and their labels here.
STEP_PHASES = {"schedule": "schedule", "message": "message", "execute": "execute (model step)",
               "process": "process outputs"}


# ---- profiler tables ------------------------------------------------------------------

def make_profiler(device: torch.device):
    """torch.profiler over every thread (the engine steps in a worker thread), CUDA activities on GPU."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        from torch._C._profiler import _ExperimentalConfig

        return profile(activities=acts, experimental_config=_ExperimentalConfig(profile_all_threads=True))
    except TypeError:  # an older torch: CPU ops of this thread only (CUDA kernels are recorded anyway)
        return profile(activities=acts)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def kernel_table(prof, device: torch.device, steps: int, top: int = TOP) -> tuple[list[dict], float]:
    """Top device kernels (CPU: top ops by self time) by total time, and device-busy us per step."""
    events = prof.events()
    if device.type == "cuda":
        dev = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = _union_us([(e.time_range.start, e.time_range.end) for e in dev]) / steps
        times = [(e.name, e.time_range.elapsed_us()) for e in dev]
    else:
        busy = float("nan")
        times = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, us, *count in times:
        agg[name][0] += us
        agg[name][1] += count[0] if count else 1
    total = sum(us for us, _ in agg.values()) or 1.0
    rows = [dict(name=name[:120], total_us=us, calls=n, us_per_step=us / steps, share=us / total)
            for name, (us, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]]
    return rows, busy


def print_kernels(title: str, rows: list[dict]) -> None:
    print_table(title, ["kernel", "us/step", "calls", "share"],
                [[r["name"][:80], r["us_per_step"], r["calls"], f"{100 * r['share']:.1f}%"] for r in rows])


# ---- decode ---------------------------------------------------------------------------

class PhaseTimer:
    """Wraps runner methods to add up the wall time spent inside them (the runner's parts of a step).

    The step's own phases (schedule, message, execute, process) come from the
    engine's timeline (`Engine.timeline`), which records them for every step.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.on = False

    def wrap(self, obj: Any, attr: str, key: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.totals[key] += time.perf_counter() - t0

        setattr(obj, attr, timed)

    def reset(self, on: bool) -> None:
        self.totals.clear()
        self.on = on


def instrument(llm) -> PhaseTimer:
    """Times the runner's parts of a step (TP 1: the runner lives in this process)."""
    import engine.runner as runner_mod

    timer = PhaseTimer()
    runner = getattr(llm.engine.executor, "runner", None)
    if runner is not None:
        timer.wrap(runner.decode_inputs, "stage", "  stage decode inputs")
        if runner.graphs is not None:
            timer.wrap(runner.graphs, "replay", "  copy inputs + graph replay (with the LM head)")
        timer.wrap(runner.model, "compute_logits", "  LM head (launch; eager steps)")
        timer.wrap(runner_mod, "sample_greedy", "  argmax + D2H (waits for the GPU; synchronous steps)")
        timer.wrap(runner, "launch", "  launch (async scheduling: update, stage, replay)")
        timer.wrap(runner, "collect", "  collect (async scheduling: waits for the step's ids)")
        timer.wrap(runner_mod, "sample", "  sampler")
    return timer


class StepWindow:
    """The engine's step records whose step started between `start()` and `stop()`."""

    def __init__(self, llm) -> None:
        self.engine = llm.engine
        self.t0 = self.t1 = 0.0
        self.cursor = 0

    def start(self) -> None:
        self.cursor = self.engine.timeline(MARK).cursor  # records from here on
        self.t0 = time.monotonic()

    def stop(self) -> None:
        self.t1 = time.monotonic()

    def records(self) -> list:
        return [r for r in self.engine.timeline(self.cursor).records if self.t0 <= r.start < self.t1]

    def stop_once_filed(self, timeout_s: float = 1.0) -> None:
        """`stop()` once a step started in the window has its record: the step thread files it after it
        hands out the step's tokens, so a caller holding its result may be ahead of the record."""
        deadline = time.monotonic() + timeout_s
        while not self.started() and time.monotonic() < deadline:
            time.sleep(0.005)
        self.stop()

    def started(self) -> int:
        """Steps started since `start()` (the window may still be open)."""
        return sum(1 for r in self.engine.timeline(self.cursor).records if r.start >= self.t0)


def host_phases(records: list, timer: PhaseTimer) -> dict[str, float]:
    """ms per step: the engine's phases from its records, the runner's parts from `timer`."""
    n = max(len(records), 1)
    phases = {label: 1e3 * sum(getattr(r, PHASE_FIELDS[name]) for r in records) / n
              for name, label in STEP_PHASES.items()}
    phases.update({k: 1e3 * v / n for k, v in timer.totals.items()})
    return phases


async def _decode_window(llm, prompts: list[list[int]], window: StepWindow, start: Callable[[], None],
                         stop: Callable[[], None], min_steps: int) -> None:
    """Decode until every stream has STEPS tokens in the window and the window holds `min_steps` engine steps.

    Tokens can arrive from steps that started before the window (async scheduling runs ahead, and a loaded
    host delivers late), so the token count alone does not prove a step ran inside it.
    """
    from engine import SamplingParams

    sp = SamplingParams(max_tokens=WARM_TOKENS + 2 * STEPS + RUN_AHEAD + SLACK_STEPS, temperature=0.0, ignore_eos=True)
    streams = [llm.engine.add_request(f"profile-{i}-{time.monotonic_ns()}", p, None, sp)
               for i, p in enumerate(prompts)]

    async def take(stream, n: int) -> None:
        got = 0
        while got < n:
            try:
                got += len((await stream.__anext__()).new_token_ids)
            except StopAsyncIteration:  # finished (ran ahead of this consumer): nothing more to wait for
                return

    await asyncio.gather(*(take(s, WARM_TOKENS) for s in streams))
    start()
    await asyncio.gather(*(take(s, STEPS) for s in streams))
    for _ in range(SLACK_STEPS):
        if window.started() >= min_steps:
            break
        await asyncio.gather(*(take(s, 1) for s in streams))
    stop()
    for s in streams:
        await s.aclose()


def profile_decode(llm, batch: int, vocab: int, device: torch.device, prompt_len: int) -> dict:
    """One batch size: timed window (wall + host phases), then a profiled window."""
    from bench.decode import prompts as make_prompts

    timer = instrument(llm) if not hasattr(llm, "_profile_timer") else llm._profile_timer
    llm._profile_timer = timer
    batch_prompts = make_prompts(batch, vocab, prompt_len)
    run = lambda window, start, stop, min_steps: llm._loop.run_until_complete(  # noqa: E731
        _decode_window(llm, batch_prompts, window, start, stop, min_steps))
    warm = StepWindow(llm)
    run(warm, warm.start, warm.stop, 0)  # warmup: graphs, allocator, first-call costs
    timed = StepWindow(llm)

    def start_timed() -> None:
        timer.reset(True)
        timed.start()

    def stop_timed() -> None:
        timed.stop()
        timer.on = False

    run(timed, start_timed, stop_timed, 2)  # two steps at least: one gap
    records = timed.records()
    gaps = [b.start - a.start for a, b in zip(records, records[1:])]
    wall_ms = 1e3 * sorted(gaps)[len(gaps) // 2] if gaps else float("nan")
    phases = host_phases(records, timer)
    prof = make_profiler(device)
    profiled = StepWindow(llm)

    def start() -> None:
        synchronize(device)
        prof.__enter__()
        profiled.start()

    def stop() -> None:
        synchronize(device)
        profiled.stop()
        prof.__exit__(None, None, None)

    run(profiled, start, stop, 1)
    steps = max(len(profiled.records()), 1)
    kernels, busy_us = kernel_table(prof, device, steps)
    profiled_wall_ms = 1e3 * (profiled.t1 - profiled.t0) / steps
    return dict(batch=batch, steps=steps, wall_ms_per_step=wall_ms, gpu_busy_ms_per_step=busy_us / 1e3,
                busy_over_wall=busy_us / 1e3 / wall_ms, profiled_wall_ms_per_step=profiled_wall_ms,
                host_phases_ms_per_step=phases, top_kernels=kernels)


def decode_section(ckpt: Path, device: torch.device, dtype: str, batches: list[int], prompt_len: int,
                   vocab: int | None = None, **llm_kwargs) -> list[dict]:
    """`vocab`: draw prompt ids below this (default: the model's vocabulary)."""
    import json

    from engine import LLM

    vocab = vocab or json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    tokens = prompt_len + WARM_TOKENS + 2 * STEPS + RUN_AHEAD + SLACK_STEPS + 8
    blocks = max(batches) * (-(-tokens // 16)) + 64
    llm = LLM(model=str(ckpt), device=device.type, dtype=dtype, max_num_seqs=max(batches),
              max_num_batched_tokens=max(4096, prompt_len), num_gpu_blocks=blocks, enable_prefix_caching=False,
              skip_tokenizer_init=True, **llm_kwargs)
    try:
        return [profile_decode(llm, b, vocab, device, prompt_len) for b in batches]
    finally:
        llm.shutdown()


def report_decode(results: list[dict]) -> None:
    for r in results:
        print_kernels(f"Decode batch {r['batch']}: top kernels ({r['steps']} steps profiled)", r["top_kernels"])
        print_table(f"Decode batch {r['batch']}: host phases (ms per step, timed window)", ["phase", "ms/step"],
                    [[k, v] for k, v in r["host_phases_ms_per_step"].items()])
    print_table("Decode: GPU busy vs wall per step (busy/wall << 1: host-bound)",
                ["batch", "wall ms/step", "GPU busy ms/step", "busy/wall", "wall under profiler"],
                [[r["batch"], r["wall_ms_per_step"], r["gpu_busy_ms_per_step"], r["busy_over_wall"],
                  r["profiled_wall_ms_per_step"]] for r in results])


# ---- vision ---------------------------------------------------------------------------

def vision_section(ckpt: Path, device: torch.device, dtype: torch.dtype, size: int, count: int,
                   iters: int = 3) -> dict:
    from bench.vision import make_images
    from models.config import load_model_config
    from models.loader import CheckpointReader
    from models.processor import ImageProcessor
    from models.registry import build_vision_model

    config = load_model_config(ckpt)
    tower = build_vision_model(config, dtype, device)
    tower.load_weights(CheckpointReader(ckpt))
    tower.eval()
    proc = ImageProcessor.from_pretrained(ckpt).preprocess(make_images(size, count))
    pixels, grid = proc.pixel_values.to(device, dtype), proc.grid_thw.to(device)
    with torch.inference_mode():
        for _ in range(2):
            tower(pixels, grid)
        synchronize(device)
        with make_profiler(device) as prof:
            t0 = time.perf_counter()
            for _ in range(iters):
                tower(pixels, grid)
            synchronize(device)
            wall_ms = 1e3 * (time.perf_counter() - t0) / iters
    kernels, busy_us = kernel_table(prof, device, iters)
    del tower
    return dict(images=count, size=size, wall_ms_per_call=wall_ms, gpu_busy_ms_per_call=busy_us / 1e3,
                busy_over_wall=busy_us / 1e3 / wall_ms, top_kernels=kernels)


def report_vision(r: dict) -> None:
    print_kernels(f"Vision tower, {r['images']} images of {r['size']}x{r['size']}: top kernels (per call)",
                  r["top_kernels"])
    print_table("Vision tower: GPU busy vs wall per call", ["images", "wall ms", "GPU busy ms", "busy/wall"],
                [[r["images"], r["wall_ms_per_call"], r["gpu_busy_ms_per_call"], r["busy_over_wall"]]])


# ---- time to first token --------------------------------------------------------------

def ttft_section(ckpt: Path, device: torch.device, dtype: str, image_size: int, iters: int = 5,
                 **llm_kwargs) -> dict:
    """One image request, max_tokens 1: its parts timed apart, then one profiled run (see the module doc)."""
    from bench.ttft import median_ms, request_inputs
    from engine import LLM, SamplingParams

    ids, image = request_inputs(ckpt, image_size)
    llm = LLM(model=str(ckpt), device=device.type, dtype=dtype, skip_tokenizer_init=True,
              enable_prefix_caching=False, **llm_kwargs)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    request = {"prompt_token_ids": ids, "images": [image]}

    try:
        llm.generate([request], params)  # first-call costs (the parts alone run slow until a request has run)
        with torch.inference_mode():
            pixels, grid = llm._image_pixels([image])
            preprocess_ms = median_ms(lambda: llm._image_pixels([image]), device, iters)
            tower_ms = median_ms(lambda: llm._encode(pixels.to(device), grid), device, iters)
        request_ms = median_ms(lambda: llm.generate([request], params), device, iters)
        stages = _request_stages(llm, request, params, device, iters)
        prof = make_profiler(device)
        window = StepWindow(llm)
        synchronize(device)
        with prof:
            window.start()
            t0 = time.perf_counter()
            llm.generate([request], params)
            synchronize(device)
            wall_ms = 1e3 * (time.perf_counter() - t0)
            window.stop_once_filed()
        records = window.records()
        kernels, busy_us = kernel_table(prof, device, 1)
        phases = host_phases(records, PhaseTimer())
        prompt_tokens = len(ids) - 1 + llm.processor.num_image_tokens(grid[0])
    finally:
        llm.shutdown()
    return dict(image_size=image_size, prompt_tokens=prompt_tokens, preprocess_ms=preprocess_ms,
                tower_ms=tower_ms, request_ms=request_ms, engine_ms=request_ms - preprocess_ms - tower_ms,
                profiled_wall_ms=wall_ms, gpu_busy_ms=busy_us / 1e3, busy_over_wall=busy_us / 1e3 / wall_ms,
                steps=len(records), step_phases_ms=phases, request_stages_ms=stages, top_kernels=kernels)


REQUEST_STAGES = ("prepare (preprocess + tower + inputs)", "queued until its step starts", "its steps",
                  "last step's end to the caller")


def _request_stages(llm, request: dict, params, device: torch.device, iters: int) -> dict[str, float]:
    """One request's wall split at its milestones (medians of `iters`): `LLM.prepare` done, its first
    step's start and its last step's end (the engine's step records), the result back in the caller."""
    samples: list[list[float]] = []
    for _ in range(iters):
        synchronize(device)
        window = StepWindow(llm)
        window.start()
        t0 = time.monotonic()
        prepared = llm.prepare(request)
        t1 = time.monotonic()
        llm._loop.run_until_complete(llm._generate([prepared], [params]))
        t2 = time.monotonic()
        window.stop_once_filed()
        records = window.records()
        if not records:
            continue
        first, last = records[0].start, max(r.end for r in records)
        samples.append([1e3 * (t1 - t0), 1e3 * (first - t1), 1e3 * (last - first), 1e3 * (t2 - last)])
    if not samples:
        return {}
    return {name: sorted(s[i] for s in samples)[len(samples) // 2] for i, name in enumerate(REQUEST_STAGES)}


def report_ttft(r: dict) -> None:
    print_kernels(f"TTFT, one {r['image_size']}px image request: top kernels (one request)", r["top_kernels"])
    print_table(f"TTFT, one {r['image_size']}px image request ({r['prompt_tokens']} prompt tokens), ms, medians",
                ["preprocess", "tower", "whole request", "engine (the rest)", "profiled wall", "GPU busy",
                 "busy/wall", "engine steps"],
                [[r["preprocess_ms"], r["tower_ms"], r["request_ms"], r["engine_ms"], r["profiled_wall_ms"],
                  r["gpu_busy_ms"], r["busy_over_wall"], r["steps"]]])
    print_table("TTFT: the engine's step phases (ms per step, profiled request)", ["phase", "ms/step"],
                [[k, v] for k, v in r["step_phases_ms"].items()])
    print_table("TTFT: the request's stages (ms, medians; the last may be negative: the caller can have its token "
                "before the step thread files the step)", ["stage", "ms"],
                [[k, v] for k, v in r["request_stages_ms"].items()])


# ---- entry points ---------------------------------------------------------------------

def smoke(json_path: str | None = None) -> dict:
    """The three sections on CPU with a tiny checkpoint (top CPU ops instead of kernels)."""
    from models.tiny import write_tiny_checkpoint

    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint("qwen3_vl", Path(tmp))
        decode = decode_section(ckpt, cpu, "float32", [1, 4], 16, vocab=500, max_model_len=512)  # ids below the specials
        vision = vision_section(ckpt, cpu, torch.float32, 64, 2, iters=1)
        ttft = ttft_section(ckpt, cpu, "float32", 64, iters=1, max_model_len=512)
    report_decode(decode)
    report_vision(vision)
    report_ttft(ttft)
    payload = {"device": "cpu (smoke)", "decode": decode, "vision": vision, "ttft": [ttft]}
    write_json(json_path, payload)
    print("smoke ok: decode batches", [r["batch"] for r in decode], "the vision tower and one image TTFT profiled")
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-vl-2b", help="configs/models/<name>.json")
    parser.add_argument("--batches", nargs="*", default=["1,64"],
                        help="decode batch sizes: 1,64 or 1 64 (none: skip the decode section)")
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN,
                        help="prompt tokens per decode request (1,100 ~ a 1024x1024 image chat)")
    parser.add_argument("--images", type=int, default=8, help="vision section: images per call (0: skip)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--ckpt-cache", default=None, help="keep/reuse the random checkpoint here")
    parser.add_argument("--no-async", dest="async_scheduling", action="store_false",
                        help="synchronous engine steps (EngineConfig.async_scheduling=False)")
    parser.add_argument("--ttft", action="store_true",
                        help="one --image-size image request's time to first token, profiled (section c)")
    parser.add_argument("--attn-sm90", nargs="*", default=[], help=ATTN_SM90_HELP + " (vision and TTFT sections)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke(args.json)
        return
    from bench.checkpoints import prepare_checkpoint

    device = torch.device("cuda")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = prepare_checkpoint(args.model, args.ckpt_cache or tmp, torch.bfloat16, device, tokenizer=args.ttft)
        torch.cuda.empty_cache()
        print(f"checkpoint ready in {time.perf_counter() - t0:.1f} s", flush=True)
        batches = int_list(args.batches)
        decode = decode_section(ckpt, device, "bfloat16", batches, args.prompt_len,
                                async_scheduling=args.async_scheduling) if batches else []
        vision, ttft = [], []
        for setting in attn_sm90_settings(args.attn_sm90):
            with ops.attention_sm90(setting) if setting is not None else contextlib.nullcontext():
                label = {None: "", True: "wgmma attention on", False: "wgmma attention off"}[setting]
                torch.cuda.empty_cache()
                if args.images:
                    vision.append({**vision_section(ckpt, device, torch.bfloat16, args.image_size, args.images),
                                   "attn_sm90": label})
                if args.ttft:
                    ttft.append({**ttft_section(ckpt, device, "bfloat16", args.image_size), "attn_sm90": label})
    name = torch.cuda.get_device_name(device)
    payload = {"device": name, "model": args.model, "prompt_len": args.prompt_len, "decode": decode,
               "vision": vision, "ttft": ttft}
    write_json(args.json, payload)
    for r in vision:
        print(r["attn_sm90"])
        report_vision(r)
    for r in ttft:
        print(r["attn_sm90"])
        report_ttft(r)
    if decode:
        report_decode(decode)
    print(f"total {time.perf_counter() - t0:.1f} s on {name}")


if __name__ == "__main__":
    main()
