"""Decode: inter-token latency, ours vs transformers `generate` vs the weight-read floor.

    python -m bench.decode --models qwen3-vl-2b qwen3-vl-8b --json $OUT/decode.json
    python -m bench.decode --models qwen3-vl-8b --tp 1,2 --batches 1   # TP=2 vs TP=1 (two GPUs)
    python -m bench.decode --models qwen3.5-0.8b --batches 1 --pdl on,off   # PDL on vs off, same run
    python -m bench.decode --models qwen3-vl-8b --tp 1,2 --batches 1,64 --custom-ar both   # NCCL vs one-shot
    python -m bench.decode --smoke      # CPU, tiny checkpoint
    python -m bench.decode --smoke --tp 2   # CPU, tiny checkpoint, TP=2 over gloo (two Ray actors)

Workload: `batch` prompts of 512 random token ids, 256 new tokens, ignore_eos,
greedy. Inter-token latency = (time for 256 tokens - time for 1 token) / 255,
so prefill is taken out the same way for both systems. The floor is the bytes
of weights one decode step must read (every decoder weight + the LM head;
embedding rows are negligible) over the copy bandwidth measured in this run.

TP > 1 runs our engine's TP workers as Ray actors (NCCL), one GPU each, started
by the engine in a local Ray instance; each TP size loads the same checkpoint
in turn, and `vs TP1` is its ITL over the TP=1 ITL at the same batch.
`--custom-ar off|on|both` runs TP > 1 with NCCL all-reduces, with the one-shot
CUDA IPC all-reduce for small rows (`EngineConfig.custom_all_reduce`), or both.
`--ckpt-cache DIR` keeps the random checkpoint for the next script (bench/serve.py).
`--pdl on,off` builds our engine once per setting of programmatic dependent launch
(ops.programmatic_launch; the decode graphs are captured with it) and reports a row each;
TP > 1 workers take SPLITVL_PDL from the environment instead (one setting per run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

import ops
from bench.common import (
    PDL_HELP, int_list, load_hf_model, measure_peaks, pdl_settings, print_table, synchronize, write_json,
)

PROMPT_LEN = 512
OUTPUT_LEN = 256


def prompts(batch: int, vocab: int, prompt_len: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    low = min(1000, vocab // 2)  # skip the low (special/byte) ids where the vocab allows
    return torch.randint(low, min(vocab, 100_000), (batch, prompt_len), generator=gen).tolist()


def decode_weight_bytes(ckpt: Path, bytes_per_value: int = 2) -> int:
    """Bytes read per decode step: language-model weights minus the embedding table, plus the LM head.

    Counted from the checkpoint's tensor shapes; a tied head reads the embedding table as the head.
    """
    import math

    from models.loader import CheckpointReader

    reader = CheckpointReader(ckpt)
    prefix, embed = "model.language_model.", "model.language_model.embed_tokens.weight"
    total = sum(math.prod(reader.shape(k)) for k in reader.keys() if k.startswith(prefix) and k != embed)
    head = "lm_head.weight" if reader.has("lm_head.weight") else embed
    return (total + math.prod(reader.shape(head))) * bytes_per_value


def itl_ms(run, device: torch.device, repeats: int = 2) -> float:
    """(t(256 tokens) - t(1 token)) / 255 in ms, best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        run(1)
        synchronize(device)
        t1 = time.perf_counter()
        run(OUTPUT_LEN)
        synchronize(device)
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / (OUTPUT_LEN - 1) * 1e3)
    return best


def ours_runner(ckpt: Path, device: str, dtype: str, tp: int, max_batch: int, prompt_len: int,
                custom_ar: bool = False):
    from engine import LLM, SamplingParams

    blocks = (max_batch * (prompt_len + OUTPUT_LEN)) // 16 + 64
    llm = LLM(model=str(ckpt), tensor_parallel_size=tp, device=device, dtype=dtype, max_num_seqs=max_batch,
              max_num_batched_tokens=max(4096, prompt_len), num_gpu_blocks=blocks, enable_prefix_caching=False,
              skip_tokenizer_init=True, custom_all_reduce=custom_ar)

    def run_for(batch_prompts):
        def run(max_tokens: int):
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in batch_prompts], sp)
            assert all(len(o.token_ids) == max_tokens for o in outs)
        return run

    return llm, run_for


def hf_run_for(hf_model, batch_prompts, device):
    ids = torch.tensor(batch_prompts, device=device)
    mask = torch.ones_like(ids)

    def run(max_tokens: int):
        hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, pad_token_id=0)
    return run


def bench_model(name: str, args, peaks, rows: list, records: list) -> None:
    from bench.checkpoints import prepare_checkpoint

    device = torch.device("cuda")
    runs = variants(args.tp, args.custom_ar, args.pdl)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        ckpt = prepare_checkpoint(name, args.ckpt_cache or tmp, torch.bfloat16, device)
        torch.cuda.empty_cache()
        ours_itl: dict[tuple[Variant, int], float] = {}
        graphed: dict[Variant, bool | None] = {}
        vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
        for v in runs:
            with ops.programmatic_launch(v.pdl):
                graphed[v] = time_ours(name, ckpt, v, args.batches, vocab, ours_itl)
        weight_bytes = decode_weight_bytes(ckpt)
        hf_model = load_hf_model(ckpt, torch.bfloat16, device) if args.hf else None
    floor_ms = weight_bytes / (peaks.copy_gbps * 1e9) * 1e3  # copy_gbps counts read + write traffic
    for batch in args.batches:
        # One timed pass for transformers (a 256-token generate takes seconds; its spread is small).
        hf_ms = (itl_ms(hf_run_for(hf_model, prompts(batch, vocab, PROMPT_LEN), device), device, repeats=1)
                 if args.hf else float("nan"))
        print(f"{name} batch={batch}: transformers {hf_ms:.2f} ms/token", flush=True)
        for v in runs:
            ms = ours_itl[(v, batch)]
            tp1 = (Variant(1, False, v.pdl), batch)
            vs_tp1 = ms / ours_itl[tp1] if tp1 in ours_itl else float("nan")
            rec = dict(model=name, tp=v.tp, custom_ar=v.custom_ar, pdl=v.pdl, batch=batch, ours_itl_ms=ms,
                       hf_itl_ms=hf_ms, floor_ms=floor_ms, ours_tok_s=batch / ms * 1e3, hf_tok_s=batch / hf_ms * 1e3,
                       vs_floor=ms / floor_ms, speedup_vs_hf=hf_ms / ms, vs_tp1=vs_tp1,
                       weight_gb=weight_bytes / 1e9, cuda_graphs=graphed[v])
            records.append(rec)
            rows.append([name, v.tp, "on" if v.custom_ar else "off", "on" if v.pdl else "off", batch, ms, hf_ms,
                         floor_ms, rec["ours_tok_s"], rec["hf_tok_s"], rec["vs_floor"], rec["speedup_vs_hf"], vs_tp1])
    del hf_model
    gc.collect()
    torch.cuda.empty_cache()


class Variant(NamedTuple):
    """One build of our engine: TP size, the one-shot all-reduce (TP > 1), PDL."""

    tp: int
    custom_ar: bool
    pdl: bool


def variants(tp_sizes: list[int], custom_ar: str, pdl: list[bool]) -> list[Variant]:
    """The builds to time, in order; TP=1 has no all-reduce to switch."""
    modes = {"off": [False], "on": [True], "both": [False, True]}[custom_ar]
    return [Variant(tp, car, p) for tp in tp_sizes for car in (modes if tp > 1 else [False]) for p in pdl]


def time_ours(name: str, ckpt: Path, v: Variant, batches: list[int], vocab: int,
              ours_itl: dict[tuple[Variant, int], float]) -> bool | None:
    """Our ITL at each batch into `ours_itl[(v, batch)]`, one engine built for the lot.

    Returns whether decode steps replay CUDA graphs (None for TP > 1: the runners live in the workers).
    """
    device = torch.device("cuda")
    llm, run_for = ours_runner(ckpt, "cuda", "bfloat16", v.tp, max(batches), PROMPT_LEN, v.custom_ar)
    graphed = llm.engine.executor.runner.graphs is not None if v.tp == 1 else None
    label = f"{name} tp={v.tp} custom_ar={'on' if v.custom_ar else 'off'} pdl={'on' if v.pdl else 'off'}"
    print(f"{label}: CUDA-graph decode {graphed}", flush=True)
    for batch in batches:
        ours_itl[(v, batch)] = itl_ms(run_for(prompts(batch, vocab, PROMPT_LEN)), device)
        print(f"{label} batch={batch}: ours {ours_itl[(v, batch)]:.2f} ms/token", flush=True)
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return graphed


def start_ray_for_tp(tp_sizes: list[int], device: str) -> bool:
    """Start local Ray for TP workers (env passed on), if TP > 1 is asked for. Returns whether it did.

    Raises:
        SystemExit: more TP ranks than visible GPUs.
    """
    if max(tp_sizes) <= 1:
        return False
    if device == "cuda" and torch.cuda.device_count() < max(tp_sizes):
        raise SystemExit(f"--tp {max(tp_sizes)} needs {max(tp_sizes)} GPUs; {torch.cuda.device_count()} visible")
    import ray

    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith(("SPLITVL_", "TORCH_CUDA_ARCH", "CUDA_HOME"))}
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    return True


def smoke(tp: int = 1) -> None:
    """Our engine on a tiny checkpoint on CPU (TP > 1: gloo between Ray actors)."""
    from engine import LLM, SamplingParams
    from models.tiny import write_tiny_checkpoint

    started = start_ray_for_tp([tp], "cpu")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = write_tiny_checkpoint("qwen3_vl", Path(tmp))
            llm = LLM(model=str(ckpt), tensor_parallel_size=tp, device="cpu", dtype="float32", max_num_seqs=4,
                      num_gpu_blocks=64, max_model_len=512)
            run = lambda n: llm.generate([{"prompt_token_ids": p} for p in prompts(2, 500, 16)],  # noqa: E731
                                         SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            print(f"smoke ok: tp {tp}, itl {itl_ms(run, torch.device('cpu')):.2f} ms on a tiny model")
            llm.shutdown()
    finally:
        if started:
            import ray

            ray.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen3-vl-2b", "qwen3-vl-8b"])
    parser.add_argument("--batches", nargs="+", default=["1,8,32,64"], help="batch sizes: 1,8 or 1 8")
    parser.add_argument("--tp", nargs="+", default=["1"], help="tensor-parallel sizes: 1,2 or 1 2")
    parser.add_argument("--no-hf", dest="hf", action="store_false")
    parser.add_argument("--tmp", default=None, help="where to write the random checkpoint")
    parser.add_argument("--ckpt-cache", default=None, help="keep/reuse random checkpoints here")
    parser.add_argument("--json", default=None)
    parser.add_argument("--pdl", nargs="*", default=[], help=PDL_HELP)
    parser.add_argument("--custom-ar", choices=("off", "on", "both"), default="off",
                        help="TP > 1: NCCL all-reduces (off), the one-shot CUDA IPC all-reduce for small rows "
                        "(on), or both")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.batches, args.tp = int_list(args.batches), int_list(args.tp)
    try:
        args.pdl = pdl_settings(args.pdl)
    except ValueError as exc:
        parser.error(str(exc))
    if args.smoke and len(args.tp) > 1:
        parser.error("--smoke takes one --tp size")
    if len(args.pdl) > 1 and max(args.tp) > 1:
        parser.error("--pdl with two settings needs --tp 1 (TP workers read SPLITVL_PDL at start)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        smoke(args.tp[0])
        return
    start_ray_for_tp(args.tp, "cuda")
    peaks = measure_peaks(torch.device("cuda"))
    print(f"{peaks.device_name}: copy {peaks.copy_gbps:.0f} GB/s, bf16 matmul {peaks.matmul_tflops:.0f} TFLOP/s")
    rows: list = []
    records: list = []
    for name in args.models:
        bench_model(name, args, peaks, rows, records)
        write_json(args.json, {"device": peaks.device_name, "peaks": asdict(peaks), "results": records})
    print_table(f"Decode, bf16, {PROMPT_LEN}-token prompts, {OUTPUT_LEN} new tokens, {peaks.device_name}",
                ["model", "TP", "custom AR", "PDL", "batch", "ours ITL ms", "HF ITL ms", "floor ms (1 GPU)", "ours tok/s", "HF tok/s",
                 "ours/floor", "HF/ours", "vs TP1"], rows)


if __name__ == "__main__":
    main()
