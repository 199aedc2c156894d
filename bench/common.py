"""Shared benchmark plumbing: device timing, machine peaks, tables, JSON."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def comma_items(values: Sequence[str]) -> list[str]:
    """Command-line items given as `a,b c` (commas and/or spaces) -> ["a", "b", "c"]."""
    return [v.strip() for item in values for v in str(item).split(",") if v.strip()]


def int_list(values: Sequence[str]) -> list[int]:
    """Command-line integers given as `1,8 32` (commas and/or spaces) -> [1, 8, 32]."""
    return [int(v) for v in comma_items(values)]


def pdl_settings(values: Sequence[str]) -> list[bool]:
    """`--pdl on,off` -> [True, False] (programmatic dependent launch settings to time, in order);
    nothing given: the process's current setting only.

    Raises:
        ValueError: a value other than on / off.
    """
    import ops

    return on_off_settings(values, "--pdl") or [ops.programmatic_launch_enabled()]


def on_off_settings(values: Sequence[str], flag: str) -> list[bool]:
    """`on,off` (commas and/or spaces) -> [True, False], in order; nothing given -> [].

    Raises:
        ValueError: a value other than on / off.
    """
    names = comma_items(values)
    if any(v not in ("on", "off") for v in names):
        raise ValueError(f"{flag} takes on and/or off, got {list(values)}")
    return [v == "on" for v in names]


PDL_HELP = "programmatic dependent launch settings to time: on,off (default: the process's, SPLITVL_PDL)"


def attn_sm90_settings(values: Sequence[str]) -> list[bool | None]:
    """`--attn-sm90 on,off` -> [True, False] (the wgmma attention kernel's switch, in order);
    nothing given: [None], the process's setting (SPLITVL_ATTN_SM90), unlabelled.

    Raises:
        ValueError: a value other than on / off.
    """
    settings: list[bool | None] = list(on_off_settings(values, "--attn-sm90"))
    return settings or [None]


ATTN_SM90_HELP = ("the Hopper (wgmma) attention kernel's settings to time, side by side: on,off "
                  "(default: the process's, SPLITVL_ATTN_SM90)")


def moe_fused_settings(values: Sequence[str], device: torch.device) -> list[bool]:
    """`--moe-fused on,off` -> [True, False] (the MoE blocks' fused decode path, in order);
    nothing given: the default on `device` (CPU on, CUDA as SPLITVL_MOE_FUSED_DECODE says).

    Raises:
        ValueError: a value other than on / off.
    """
    from models.layers.moe import fused_decode_default

    return on_off_settings(values, "--moe-fused") or [fused_decode_default(device)]


MOE_FUSED_HELP = ("MoE fused decode path (router + routing, combine + next norm) settings to time: on,off "
                  "(default: the device's, SPLITVL_MOE_FUSED_DECODE on CUDA)")


def moe_block_settings(values: Sequence[str], device: torch.device) -> list[bool]:
    """`--moe-block on,off` -> [True, False] (the MoE blocks' one-op decode path,
    `ops.moe_decode_block`, in order); nothing given: the default on `device` (CPU on, CUDA unless
    SPLITVL_MOE_BLOCK_KERNEL=0).

    Raises:
        ValueError: a value other than on / off.
    """
    from models.layers.moe import block_kernel_default

    return on_off_settings(values, "--moe-block") or [block_kernel_default(device)]


MOE_BLOCK_HELP = ("MoE one-op decode block (post-attention add + norm, router, routing, experts, combine: "
                  "ops.moe_decode_block) settings to time: on,off (default: the device's; on CUDA on unless "
                  "SPLITVL_MOE_BLOCK_KERNEL=0)")


def config_path(name: str) -> Path:
    """`configs/models/<name>.json`, the published config.json of a real architecture."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no architecture config {path.name}; known: {known}")
    return path


def load_hf_model(ckpt: str | Path, dtype: torch.dtype, device: torch.device | str):
    """transformers' own model class for the checkpoint in `ckpt`, in eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(ckpt)
    model_cls = getattr(transformers, config.architectures[0])
    return model_cls.from_pretrained(ckpt, dtype=dtype).to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of `fn` in milliseconds, the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def cuda_time_fn(fn: Callable[[], object], warmup: int = 5, iters: int = 50) -> float:
    """Mean device time of `fn` in milliseconds measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@dataclass(frozen=True, slots=True)
class MachinePeaks:
    """What this card does in practice, measured in the same run as the benchmark."""

    copy_gbps: float  # bytes read + written per second by a large device copy
    matmul_tflops: float  # bf16 dense matmul rate
    device_name: str


def measure_peaks(device: torch.device) -> MachinePeaks:
    if device.type != "cuda":
        return MachinePeaks(copy_gbps=float("nan"), matmul_tflops=float("nan"), device_name="cpu")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time_fn(lambda: dst.copy_(src), warmup=3, iters=20)
    copy_gbps = 2 * src.numel() / (ms * 1e-3) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = cuda_time_fn(lambda: torch.mm(a, b), warmup=5, iters=20)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    return MachinePeaks(copy_gbps, tflops, torch.cuda.get_device_name(device))


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render a markdown table, print it and return it."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))
