"""Vision tower: ours vs transformers vs the compute floor.

    python -m bench.vision --models qwen3-vl-2b qwen3-vl-8b --json $OUT/vision.json
    python -m bench.vision --smoke        # CPU, tiny checkpoint: keeps this script importable
    python -m bench.vision --attn-sm90 on,off   # our tower with each attention kernel, row by row
    python -m bench.vision --vit-attn splitvl sdpa flash   # our tower on ours / torch's attention kernels

Random bf16 weights of the real architecture (configs/models/*.json); the same
weights feed both towers. Images are preprocessed once by our processor (the
Qwen3-VL semantics), so both towers see identical pixel values and grids.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

import ops
from bench.common import (
    ATTN_SM90_HELP, attn_sm90_settings, load_hf_model, measure_peaks, print_table, time_fn, write_json,
)
from models.qwen3_vl.vision import ATTENTION_BACKENDS

SIZES = (448, 1024)
BATCHES = (1, 8)


def vision_flops(cfg, grid_thw: torch.Tensor) -> float:
    """Matmul + attention FLOPs of one tower call over the images in `grid_thw`."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    merge = cfg.spatial_merge_size**2
    n_levels = 1 + len(cfg.deepstack_visual_indexes)
    flops = 0.0
    for t, gh, gw in grid_thw.tolist():
        n = t * gh * gw
        flops += 2 * n * patch_dim * h
        per_block = 2 * n * h * 3 * h + 2 * n * h * h + 2 * 2 * n * h * i
        per_block += 2 * 2 * t * (gh * gw) ** 2 * h  # QK^T and PV, one segment per frame
        flops += cfg.depth * per_block
        tokens, wide = n // merge, h * merge
        flops += n_levels * (2 * tokens * wide * wide + 2 * tokens * wide * cfg.out_hidden_size)
    return flops


def make_images(size: int, count: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(size)
    return [
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy())
        for _ in range(count)
    ]


def hf_tower_forward(tower, pixels: torch.Tensor, grid: torch.Tensor):
    out = tower(pixels, grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out[0]


def bench_model(name: str, device: torch.device, peaks, rows: list, records: list,
                ckpt_cache: str | None = None, attn_sm90: Sequence[bool | None] = (None,),
                vit_attn: Sequence[str | None] = (None,)) -> None:
    """Time our tower (once per `attn_sm90` setting of the wgmma attention kernel and per `vit_attn`
    attention backend; None: the process's) and transformers' on each image size and batch; append
    table rows and records."""
    from bench.checkpoints import prepare_checkpoint
    from models.config import load_model_config
    from models.loader import CheckpointReader
    from models.processor import ImageProcessor
    from models.registry import build_vision_model

    dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = prepare_checkpoint(name, ckpt_cache or tmp, dtype, device)
        config = load_model_config(ckpt)
        ours = build_vision_model(config, dtype, device)
        ours.load_weights(CheckpointReader(ckpt))
        hf_model = load_hf_model(ckpt, dtype, device)
        # The published Qwen3-VL limits, so a 1024x1024 image stays 1024x1024.
        processor = ImageProcessor.from_pretrained(ckpt)
    hf_tower, vcfg = hf_model.model.visual, hf_model.config.vision_config
    del hf_model  # keeps only the tower
    for size in SIZES:
        for batch in BATCHES:
            proc = processor.preprocess(make_images(size, batch))
            pixels = proc.pixel_values.to(device, dtype)
            grid = proc.grid_thw.to(device)
            with torch.inference_mode():
                hf_ms = time_fn(lambda: hf_tower_forward(hf_tower, pixels, grid), device)
            floor_ms = vision_flops(vcfg, proc.grid_thw) / (peaks.matmul_tflops * 1e12) * 1e3
            for setting, backend in itertools.product(attn_sm90, vit_attn):
                default = ours.blocks[0].attn.backend
                ours.set_attention_backend(backend or default)
                with torch.inference_mode(), (
                        ops.attention_sm90(setting) if setting is not None else contextlib.nullcontext()):
                    ours_ms = time_fn(lambda: ours(pixels, grid), device)
                ours.set_attention_backend(default)
                label = " ".join([name, *([f"sm90={'on' if setting else 'off'}"] if setting is not None else []),
                                  *([f"attn={backend}"] if backend else [])])
                rec = dict(model=label, size=size, batch=batch, ours_ms_per_image=ours_ms / batch,
                           hf_ms_per_image=hf_ms / batch, floor_ms_per_image=floor_ms / batch,
                           ours_images_per_s=batch / ours_ms * 1e3, vs_floor=ours_ms / floor_ms,
                           speedup_vs_hf=hf_ms / ours_ms)
                records.append(rec)
                rows.append([label, f"{size}x{size}", batch, rec["ours_ms_per_image"], rec["hf_ms_per_image"],
                             rec["floor_ms_per_image"], rec["ours_images_per_s"], rec["vs_floor"],
                             rec["speedup_vs_hf"]])
    del ours, hf_tower
    if device.type == "cuda":
        torch.cuda.empty_cache()


def smoke() -> None:
    """Runs our tower on a tiny checkpoint on CPU; a bench that cannot import fails here."""
    from models.config import load_model_config
    from models.loader import CheckpointReader
    from models.processor import ImageProcessor
    from models.registry import build_vision_model
    from models.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint("qwen3_vl", Path(tmp))
        config = load_model_config(ckpt)
        tower = build_vision_model(config, torch.float32, torch.device("cpu"))
        tower.load_weights(CheckpointReader(ckpt))
        proc = ImageProcessor.from_pretrained(ckpt).preprocess(make_images(64, 2))
        with torch.inference_mode():
            embeds, deepstack = tower(proc.pixel_values, proc.grid_thw)
        print(f"smoke ok: embeds {tuple(embeds.shape)}, deepstack {tuple(deepstack.shape)}, "
              f"flops {vision_flops(config.vision, proc.grid_thw):.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen3-vl-2b", "qwen3-vl-8b"])
    parser.add_argument("--ckpt-cache", default=None, help="keep/reuse random checkpoints here (bench/decode.py too)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--attn-sm90", nargs="*", default=[], help=ATTN_SM90_HELP)
    parser.add_argument("--vit-attn", nargs="*", default=[], choices=ATTENTION_BACKENDS,
                        help="the tower's attention backends to time, row by row (default: the process's)")
    args = parser.parse_args()
    try:
        attn_sm90 = attn_sm90_settings(args.attn_sm90)
    except ValueError as exc:
        parser.error(str(exc))
    if args.smoke:
        smoke()
        return
    device = torch.device("cuda")
    peaks = measure_peaks(device)
    print(f"{peaks.device_name}: copy {peaks.copy_gbps:.0f} GB/s, bf16 matmul {peaks.matmul_tflops:.0f} TFLOP/s")
    rows: list = []
    records: list = []
    for name in args.models:
        bench_model(name, device, peaks, rows, records, args.ckpt_cache, attn_sm90, args.vit_attn or [None])
    write_json(args.json, {"device": peaks.device_name, "peaks": asdict(peaks), "results": records})
    print_table(f"Vision tower, bf16, {peaks.device_name}",
                ["model", "image", "batch", "ours ms/img", "HF ms/img", "floor ms/img", "ours img/s",
                 "ours/floor", "HF/ours"], rows)


if __name__ == "__main__":
    main()
