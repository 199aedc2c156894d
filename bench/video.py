"""TTFT of one video chat request over HTTP (default: 8 s of 720p at 30 fps), one GPU.

    # random-weight Qwen3-VL-8B, the one-GPU layout:
    python -m bench.video --model qwen3-vl-8b --json $OUT/video.json
    # CPU smoke (tiny checkpoint):
    python -m bench.video --tiny qwen3_vl --config configs/bench/serve-cpu-smoke.yaml \
        --width 128 --height 72 --seconds 2 --requests 2

The clip is smooth coloured noise written with PyAV (libx264), sent as a data
URL; each request uses a different clip (the embedding cache never hits). TTFT
covers the whole video path: body read, decode + sampling + resize in the
router, the vision replica, the prefill of every frame group, the first token.
A checkpoint without a video_preprocessor_config.json gets the values of
Qwen3-VL's published one (4,096 .. 25,165,824 pixels per clip, fps 2, as the
processor's class defaults say), so the token count is what a real model sees.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from pathlib import Path

from bench.serve import layout_args, model_checkpoint, start_app, start_ray, stop_app

REPO = Path(__file__).resolve().parent.parent
QWEN3_VL_VIDEO_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
}


def clip(seconds: float, fps: int, width: int, height: int, seed: int) -> bytes:
    from tests.videos import noise_video

    return noise_video(seconds=seconds, fps=fps, height=height, width=width, seed=seed, codec="libx264")


def one_request(client, model_id: str, video: bytes, output_len: int) -> dict:
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    start = time.perf_counter()
    ttft, prompt_tokens = None, None
    stream = client.chat.completions.create(
        model=model_id, max_tokens=output_len, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                               {"type": "text", "text": "Describe the video."}]}],
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    return {"ttft_s": ttft, "total_s": time.perf_counter() - start, "prompt_tokens": prompt_tokens}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-vl-8b", help="configs/models/<name>.json architecture")
    parser.add_argument("--tiny", default=None, help="a models.tiny architecture instead (CPU smoke)")
    parser.add_argument("--ckpt", default=None, help="(unused: random weights or --tiny)")
    parser.add_argument("--ckpt-cache", default=None, help="keep/reuse random checkpoints here")
    parser.add_argument("--config", default=str(REPO / "configs/bench/serve-one-gpu.yaml"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--requests", type=int, default=5, help="measured requests (after one warm-up)")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)

    import openai
    import torch

    ckpt, _ = model_checkpoint(opts)
    if not (ckpt / "video_preprocessor_config.json").is_file():
        (ckpt / "video_preprocessor_config.json").write_text(json.dumps(QWEN3_VL_VIDEO_CONFIG))
    args = layout_args(Path(opts.config), ckpt, "bench-video")
    args.setdefault("llm", {})["max_model_len"] = opts.max_model_len
    args.setdefault("limits", {}).update(max_request_bytes=256 * 2**20, max_tokens_limit=opts.output_len)
    owns_ray = start_ray(1 if torch.cuda.is_available() else None)
    try:
        client = openai.OpenAI(base_url=start_app(args) + "/v1", api_key="unused", max_retries=0, timeout=600)
        videos = [clip(opts.seconds, opts.fps, opts.width, opts.height, seed) for seed in range(opts.requests + 1)]
        one_request(client, "bench-video", videos[0], opts.output_len)  # warm-up (compiles, allocates)
        rows = [one_request(client, "bench-video", v, opts.output_len) for v in videos[1:]]
    finally:
        stop_app(owns_ray)
    ttfts = [r["ttft_s"] for r in rows]
    result = {
        "video": f"{opts.seconds:g} s, {opts.width}x{opts.height}, {opts.fps} fps, {len(videos[1])} bytes",
        "model": opts.tiny or opts.model, "prompt_tokens": rows[0]["prompt_tokens"],
        "ttft_s_median": statistics.median(ttfts), "ttft_s_min": min(ttfts), "rows": rows,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(result, indent=2))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
