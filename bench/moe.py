"""Full-size MoE decode without a checkpoint on disk: ours vs transformers vs the active-weight floor.

    python -m bench.moe --json $OUT/moe.json                  # Qwen3-VL-30B-A3B, all 48 layers
    python -m bench.moe --batches 1 --layers 12 --no-hf       # a quicker slice
    python -m bench.moe --model qwen3.5-35b-a3b --no-hf       # the hybrid Qwen3.5 MoE (40 layers)
    python -m bench.moe --batches 1 --no-hf --pdl on,off      # programmatic dependent launch on vs off
    python -m bench.moe --batches 1 --no-hf --moe-fused on,off  # fused MoE decode ops on vs off
    python -m bench.moe --batches 1 --no-hf --moe-block on,off  # one-op MoE decode block on vs off
    python -m bench.moe --batches 1 --no-hf --norm-qkv on,off   # input norm folded into the qkv on vs off
    python -m bench.moe --batches 1 --no-hf --decode-merge on,off  # paged decode's merge in its kernel on vs off
    python -m bench.moe --model qwen3-vl-2b --batches 1 --no-hf --stream-wide on,off  # a dense model too
    python -m bench.moe --smoke [--model qwen3_5_moe]         # CPU, a tiny MoE config

Our language model is built straight in GPU memory and filled with random
weights as transformers initialises them (`models.random_weights.init_random_weights`,
what `load_format: dummy` serves), the init the random-checkpoint path saves.
A decode step is the model over `batch` sequences of `--context` cached tokens
plus the LM head, timed eagerly and as a replayed CUDA graph (the engine
captures MoE decode too). The floor is the bytes one step must read (attention,
router, norms and LM head, plus for each MoE layer the experts this step's
routing hit, counted on the device; for hybrid Qwen3.5 models also the
linear-attention state each step reads and writes back) over the copy bandwidth
of this run. `--pdl on,off` times each batch with programmatic dependent launch
on and off (ops.programmatic_launch; the graph is captured under each setting), and
`--moe-fused on,off` with the MoE blocks' fused decode path (router + routing in one op,
the combine folded into the next norm; steps of up to 16 tokens) on and off, `--moe-block on,off`
with the one-op block path (`ops.moe_decode_block`: the post-attention add + norm and the whole
block in one launch; steps of up to 8 tokens) on and off, ahead of the fused path, `--norm-qkv on,off`
with each layer's input norm folded into its qkv projection (ops.add_rms_norm_linear_small, steps of
up to 16 tokens; a norm that takes a pending MoE combine keeps its own kernel) on and off, and
`--decode-merge on,off` with paged decode's partition merge done by its last CTA (one launch) or by
the merge kernel. Every combination of the settings given is timed on the one model build.
transformers runs the same config with its own random weights, in the same run
when both fit the GPU, else after ours is freed; its ITL is
(t(1 + n tokens) - t(1 token)) / n of `generate` on `context`-token prompts.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass

import torch

import ops
from bench.common import (
    MOE_BLOCK_HELP, MOE_FUSED_HELP, PDL_HELP, config_path, cuda_time_fn, int_list, measure_peaks, moe_block_settings,
    moe_fused_settings, on_off_settings, pdl_settings, print_table, write_json,
)

BLOCK = 16  # KV block size, as the engine's default


@dataclass(frozen=True, slots=True)
class StepResult:
    batch: int
    pdl: bool  # whether the step's kernels used programmatic dependent launch
    moe_fused: bool  # whether the MoE blocks took the fused decode path
    moe_block: bool  # whether the MoE blocks took the one-op block path (ahead of the fused one)
    stream_wide: bool  # whether linears wider than their input streamed too (`set_streamed_small_rows`)
    norm_qkv: bool  # whether the input norm was folded into the qkv projection (`set_input_norm_folded`)
    decode_merge: bool  # whether paged decode merged its partitions in the decode kernel (`ops.decode_fused_merge`)
    eager_ms: float
    graph_ms: float
    floor_ms: float
    active_gb: float
    experts_hit: float  # mean distinct experts per MoE layer


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def load_config(name: str, layers: int | None) -> dict:
    data = json.loads(config_path(name).read_text())
    if layers:
        data["text_config"]["num_hidden_layers"] = layers
    return data


def build_ours(data: dict, dtype: torch.dtype, device: torch.device):
    """Our decoder for `data` (an HF config dict), random weights made in place on `device`
    (`load_format: dummy`'s init)."""
    from models.config import model_config_from_hf
    from models.layers.parallel import SINGLE
    from models.random_weights import init_random_weights
    from models.registry import build_language_model

    config = model_config_from_hf(data)
    model = build_language_model(config, SINGLE, dtype, device)
    init_random_weights(model, config.text.initializer_range)
    return config, model.eval()


def decode_inputs(config, batch: int, context: int, dtype: torch.dtype, device: torch.device, state_shapes=None):
    """(input_ids, positions, attention metadata, per-layer caches) of one decode step after `context`
    tokens. Hybrid models (`state_shapes` = the model's per-slot (conv, recurrent) shapes): the
    linear-attention layers get one state slot per sequence instead of paged KV."""
    from models.layers.attention import AttentionMetadata

    text = config.text
    per_seq = context // BLOCK + 1
    tables = torch.arange(batch * per_seq, dtype=torch.int32, device=device).view(batch, per_seq)
    shape = (batch * per_seq, BLOCK, text.num_key_value_heads, text.head_dim)
    caches = []
    for i in range(text.num_hidden_layers):
        if state_shapes is not None and text.layer_type(i) == "linear_attention":
            conv, recurrent = state_shapes
            caches.append((torch.zeros((batch, *conv), dtype=dtype, device=device),
                           torch.zeros((batch, *recurrent), dtype=torch.float32, device=device)))
        else:
            caches.append((torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)))
    seq_lens = torch.full((batch,), context + 1, dtype=torch.int32, device=device)
    attn = AttentionMetadata(
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.arange(batch + 1, dtype=torch.int32, device=device) * (context + 1),
        max_seqlen_q=1, max_seqlen_k=context + 1,
        slot_mapping=(tables[:, context // BLOCK].long() * BLOCK + context % BLOCK),
        block_tables=tables, seq_lens=seq_lens, decode_only=True,
        state_indices=torch.arange(batch, dtype=torch.int32, device=device) if state_shapes else None,
    )
    ids = torch.randint(0, min(text.vocab_size, 100_000), (batch,), device=device)
    positions = torch.full((3, batch), context, dtype=torch.long, device=device)
    return ids, positions, attn, caches


def state_bytes(config, caches) -> int:
    """Bytes of linear-attention state one decode step reads and writes back (0 without any)."""
    text = config.text
    if text.layer_types is None:
        return 0
    return 2 * sum(conv.nbytes + recurrent.nbytes for i, (conv, recurrent) in enumerate(caches)
                   if text.layer_type(i) == "linear_attention")


def active_bytes(model, batch_step) -> tuple[int, float]:
    """(bytes one step reads, mean distinct experts per MoE layer), routing counted in one eager step.

    The step runs unfused (`FusedExperts.forward` is where the routing is seen); the fused
    path routes the same pairs.
    """
    from models.layers.moe import FusedExperts, set_block_kernel, set_fused_decode
    from ops import MoePermutation

    hits: list[int] = []
    expert_bytes: list[int] = []

    def count(module, args) -> None:  # args: (x, topk_weights, alignment or permutation)
        routing = args[2]
        if isinstance(routing, MoePermutation):  # expert e's rows end at expert_offsets[e]
            offsets = routing.expert_offsets
            hits.append(int((torch.diff(offsets, prepend=offsets.new_zeros(1)) > 0).sum()))
        else:
            owners = routing.block_experts
            hits.append(torch.unique(owners[owners >= 0]).numel())
        expert_bytes.append(module.gate_up_proj[0].nbytes + module.down_proj[0].nbytes)

    handles = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, FusedExperts)]
    set_fused_decode(model, False)  # the caller then sets the paths it times
    set_block_kernel(model, False)
    batch_step()
    for handle in handles:
        handle.remove()
    dense = sum(p.nbytes for n, p in model.named_parameters() if "embed_tokens" not in n and ".experts." not in n)
    head = 0 if any("lm_head" in n for n, _ in model.named_parameters()) else model.model.embed_tokens.weight.nbytes
    routed = sum(h * b for h, b in zip(hits, expert_bytes))
    return dense + head + routed, sum(hits) / max(1, len(hits))


def profile_replays(replay, batch: int, steps: int = 5) -> None:
    """Print the top kernels of `steps` replays of the captured step (torch.profiler, CUDA activities)."""
    from bench.profile import kernel_table, make_profiler, print_kernels

    with make_profiler(torch.device("cuda")) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    rows, busy = kernel_table(prof, torch.device("cuda"), steps, top=25)
    print_kernels(f"batch {batch}: top kernels of a graph-replayed step (GPU busy {busy:.0f} us/step)", rows)


def time_ours(model, config, batch: int, context: int, copy_gbps: float, device: torch.device,
              profile: bool = False, moe_fused: bool = True, stream_wide: bool = False,
              moe_block: bool = False, norm_qkv: bool = False) -> StepResult:
    from models.layers.linear import set_input_norm_folded, set_streamed_small_rows
    from models.layers.moe import set_block_kernel, set_fused_decode

    dtype = next(model.parameters()).dtype
    ids, positions, attn, caches = decode_inputs(config, batch, context, dtype, device, model.state_shapes())

    def step() -> torch.Tensor:
        return model.compute_logits(model(ids, positions, attn, caches, None))

    with torch.no_grad():
        nbytes, hit = active_bytes(model, step)
        nbytes += state_bytes(config, caches)
        set_fused_decode(model, moe_fused)
        set_block_kernel(model, moe_block)
        set_streamed_small_rows(model, stream_wide)
        set_input_norm_folded(model, norm_qkv)
        if device.type != "cuda":
            start = time.perf_counter()
            step()
            eager = graphed = (time.perf_counter() - start) * 1e3
        else:
            eager = cuda_time_fn(step, warmup=3, iters=10)
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                step()
            graphed = cuda_time_fn(graph.replay, warmup=3, iters=20)
            if profile:
                profile_replays(graph.replay, batch)
            del graph
    floor = nbytes / (copy_gbps * 1e9) * 1e3  # copy_gbps counts read + write traffic, as bench/decode.py
    set_streamed_small_rows(model, False)
    set_input_norm_folded(model, None)
    return StepResult(batch, ops.programmatic_launch_enabled(), moe_fused, moe_block, stream_wide, norm_qkv,
                      ops.decode_fused_merge_enabled(), eager, graphed, floor, nbytes / 1e9, hit)


def time_hf(data: dict, batch: int, context: int, new_tokens: int, device: torch.device) -> float:
    """transformers' decode ms/step at `batch` (random init in GPU memory)."""
    from models.random_weights import build_hf_model

    model = build_hf_model(data, torch.bfloat16, device)
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, 100_000, (batch, context), generator=gen).to(device)

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        run(2)  # warm-up
        ms = (run(1 + new_tokens) - run(1)) / new_tokens * 1e3
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def time_hf_batches(data: dict, batches: list[int], args, holder: list, ours_gb: float,
                    device: torch.device) -> dict[int, float]:
    """transformers' ms/step per batch: beside our model (the only reference to it is in
    `holder`) when both fit, else after it is freed."""
    gc.collect()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0] / 1e9
    if free < ours_gb * 1.1 + 8:
        print(f"transformers after ours: {free:.0f} GB free < {ours_gb * 1.1 + 8:.0f} GB for both", flush=True)
        holder.clear()
        gc.collect()
        torch.cuda.empty_cache()
    result = {}
    for b in batches:
        try:
            result[b] = time_hf(data, b, args.context, args.hf_tokens, device)
        except torch.cuda.OutOfMemoryError:
            if not holder:
                raise
            print("transformers beside ours ran out of memory; retrying after ours is freed", flush=True)
        if b not in result:  # retried outside the handler, whose traceback holds the failed model
            holder.clear()
            gc.collect()
            torch.cuda.empty_cache()
            result[b] = time_hf(data, b, args.context, args.hf_tokens, device)
        print(f"batch {b}: transformers {result[b]:.2f} ms/step", flush=True)
    return result


def tiny_moe_config(arch: str) -> dict:
    import tempfile
    from pathlib import Path

    from models.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads((write_tiny_checkpoint(arch, Path(tmp)) / "config.json").read_text())


def main(argv: list[str] | None = None) -> None:
    from models.layers.linear import NORM_FOLDED_ON_CUDA
    from models.loader import weight_bytes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="configs/models/<name>.json (default qwen3-vl-30b-a3b); --smoke: a tiny arch (default "
                             "qwen3_vl_moe)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    parser.add_argument("--batches", nargs="+", default=["1,64"])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--hf-batches", nargs="+", default=["64"], help="batches transformers also runs")
    parser.add_argument("--hf-tokens", type=int, default=8, help="decode steps timed for transformers")
    parser.add_argument("--no-hf", dest="hf", action="store_false")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="also print each batch's top kernels (GPU)")
    parser.add_argument("--pdl", nargs="*", default=[], help=PDL_HELP)
    parser.add_argument("--moe-fused", nargs="*", default=[], help=MOE_FUSED_HELP)
    parser.add_argument("--moe-block", nargs="*", default=[], help=MOE_BLOCK_HELP)
    parser.add_argument("--stream-wide", nargs="*", default=[],
                        help="small-row linears wider than their input (qkv, gate_up) streamed too: on,off "
                             "(default off: cuBLAS for those, as the models run)")
    parser.add_argument("--norm-qkv", nargs="*", default=[],
                        help="each layer's input norm folded into its qkv projection at decode: on,off "
                             "(default: the device's, SPLITVL_NORM_QKV_FUSED on CUDA)")
    parser.add_argument("--decode-merge", nargs="*", default=[],
                        help="paged decode's partition merge in the decode kernel's last CTA: on,off "
                             "(default: the current setting, SPLITVL_DECODE_FUSED_MERGE)")
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, the tiny MoE config")
    args = parser.parse_args(argv)
    try:
        pdl = pdl_settings(args.pdl)
        fused = moe_fused_settings(args.moe_fused, torch.device("cpu" if args.smoke else "cuda"))
        block = moe_block_settings(args.moe_block, torch.device("cpu" if args.smoke else "cuda"))
        wide = on_off_settings(args.stream_wide, "--stream-wide") or [False]
        norm_qkv = on_off_settings(args.norm_qkv, "--norm-qkv") or [args.smoke or NORM_FOLDED_ON_CUDA]
        merge = on_off_settings(args.decode_merge, "--decode-merge") or [ops.decode_fused_merge_enabled()]
    except ValueError as exc:
        parser.error(str(exc))
    batches, hf_batches = int_list(args.batches), int_list(args.hf_batches) if args.hf else []
    if args.smoke:
        arch = args.model or "qwen3_vl_moe"
        data, device, dtype, hf_batches = tiny_moe_config(arch), torch.device("cpu"), torch.float32, []
        args.model = f"tiny {arch}"
    else:
        args.model = args.model or "qwen3-vl-30b-a3b"
        data, device, dtype = load_config(args.model, args.layers), torch.device("cuda"), torch.bfloat16
    peaks = measure_peaks(device)
    print(f"{peaks.device_name}: copy {peaks.copy_gbps:.0f} GB/s, bf16 matmul {peaks.matmul_tflops:.0f} TFLOP/s",
          flush=True)
    config, model = build_ours(data, dtype, device)
    ours_gb = weight_bytes(model) / 1e9
    results = []
    settings = ((b, on, fuse, blk, w, nq, mg) for b in batches for on in pdl for fuse in fused for blk in block
                for w in wide for nq in norm_qkv for mg in merge)
    for b, on, fuse, blk, w, nq, mg in settings:
        with ops.programmatic_launch(on), ops.decode_fused_merge(mg):
            results.append(time_ours(model, config, b, args.context, peaks.copy_gbps, device, args.profile, fuse, w,
                                     blk, nq))
    for r in results:
        print(f"batch {r.batch} pdl {_on(r.pdl)} moe-fused {_on(r.moe_fused)} moe-block {_on(r.moe_block)} "
              f"stream-wide {_on(r.stream_wide)} norm-qkv {_on(r.norm_qkv)} decode-merge {_on(r.decode_merge)}: "
              f"eager {r.eager_ms:.2f} ms, graph {r.graph_ms:.2f} ms, "
              f"floor {r.floor_ms:.2f} ms "
              f"({r.active_gb:.1f} GB read, {r.experts_hit:.1f} experts/layer)", flush=True)
    holder = [model]
    del model
    hf_ms = time_hf_batches(data, hf_batches, args, holder, ours_gb, device) if hf_batches else {}
    layers = data["text_config"]["num_hidden_layers"]
    rows, records = [], []
    for r in results:
        hf = hf_ms.get(r.batch, float("nan"))
        best = min(r.eager_ms, r.graph_ms)
        records.append(dict(model=args.model, layers=layers, context=args.context, hf_ms=hf,
                            ours_tok_s=r.batch / best * 1e3, hf_tok_s=r.batch / hf * 1e3, vs_floor=best / r.floor_ms,
                            **{f: getattr(r, f) for f in StepResult.__slots__}))
        rows.append([args.model, layers, r.batch, _on(r.pdl), _on(r.moe_fused), _on(r.moe_block), _on(r.stream_wide),
                     _on(r.norm_qkv), _on(r.decode_merge),
                     r.eager_ms, r.graph_ms, r.floor_ms, best / r.floor_ms, r.batch / best * 1e3, hf,
                     r.batch / hf * 1e3, r.experts_hit])
    print_table(f"MoE decode in memory, {dtype}, {args.context}-token context, {peaks.device_name}, "
                f"copy {peaks.copy_gbps:.0f} GB/s",
                ["model", "layers", "batch", "PDL", "MoE fused", "MoE block", "stream wide", "norm qkv", "decode merge",
                 "eager ms", "graph ms", "floor ms", "best/floor", "ours tok/s",
                 "HF ms", "HF tok/s", "experts/layer"], rows)
    write_json(args.json, {"device": peaks.device_name, "copy_gbps": peaks.copy_gbps,
                           "matmul_tflops": peaks.matmul_tflops, "results": records})


if __name__ == "__main__":
    main()
