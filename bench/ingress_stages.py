"""CPU cost of each stage an image request passes on the client and in the ingress, timed in this process.

    python -m bench.ingress_stages --tiny qwen3_vl --image-size 1024 --iters 20
    python -m bench.ingress_stages --tiny qwen3_vl --processor published   # Qwen3-VL's pixel budget: 1024 kept
    python -m bench.ingress_stages --ckpt /path/to/checkpoint --image-size 1024   # the real tokenizer/processor

Per stage, the median ms of `--iters` runs on distinct images (so no cache
helps), and whether the ingress runs it on its event loop (where it holds up
every other request and every streamed token of that replica) or in a thread:

- client: the request body serialized to JSON (what the load generator's
  `json=` did per request), one SSE token chunk parsed;
- ingress: JSON parse, request validation, chat template + tokenization,
  base64 decode, image decode (header check, pixels, EXIF, RGB), the embedding
  cache key (the content hash of the pixels), resize to the patch grid, one SSE
  token chunk built (`completion_object` + `sse`);
- "image thread, all": what the router's one worker thread per image runs
  (`load_request_image` with `Router._prepare_image`: base64, decode, key, resize), and the
  same for a file the router has seen whose embeddings are cached (base64 and the file's digest only).

`--processor published` preprocesses with the published Qwen3-VL settings (what the
random-weight checkpoints of bench.serve carry): a 1024px image needs no resize there,
while the tiny checkpoint's smaller pixel budget resizes it to 992px.

Both kinds of image are timed: the bench's smooth random JPEG
(`bench.load.make_image_url`) and a noisy one whose JPEG is photo-sized.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.load import chat_body, make_image_url


def noisy_image_url(size: int, seed: int) -> str:
    """A JPEG data URL of a high-entropy `size`^2 image (about photo-sized at quality 90)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR), dtype=np.int16)
    image = np.clip(image + rng.integers(-24, 25, image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _median_ms(fn: Callable[[Any], Any], inputs: list[Any]) -> tuple[float, list[Any]]:
    outs, times = [], []
    for x in inputs:
        t = time.perf_counter()
        outs.append(fn(x))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), outs


def time_stages(ckpt: Path, urls: list[str], processor_json: Path | None = None) -> list[tuple[str, str, float]]:
    """(stage, where it runs in the ingress, median ms) for one request per url."""
    from deployments.embedding_cache import image_key
    from deployments.media import decode_data_url, decode_image
    from deployments.messages import ChoiceDelta
    from deployments.metrics import MetricsRecorder
    from deployments.openai_api import sse
    from deployments.prompt import chat_prompt_text
    from deployments.protocol import ChatCompletionRequest, choice_dict, completion_object
    from deployments.router import Router, encoded_digest
    from engine.multimodal import content_digest
    from models.processor import ImageProcessor

    router = Router({"model": str(ckpt), "model_id": "bench", "device": "cpu"}, None, None,
                    MetricsRecorder("bench", "bench"))
    if processor_json is not None:
        router.processor = ImageProcessor.from_dict(json.loads(processor_json.read_text()))
        router._settings = repr(router.processor)
    policy, tokenizer, processor = router.policy, router.tokenizer, router.processor
    bodies = [chat_body("bench", u, 256) for u in urls]
    rows: list[tuple[str, str, float]] = []
    digest = "sha256" if content_digest("", np.zeros(0, np.uint8)).startswith("sha256:") else "blake3"

    def stage(name: str, where: str, fn: Callable[[Any], Any], inputs: list[Any]) -> list[Any]:
        ms, outs = _median_ms(fn, inputs)
        rows.append((name, where, ms))
        return outs

    raw = stage("client: json.dumps body", "client", lambda b: json.dumps(b).encode(), bodies)
    parsed = stage("ingress: json.loads body", "event loop", json.loads, raw)
    reqs = stage("ingress: validate request", "event loop", ChatCompletionRequest.model_validate, parsed)
    stage("ingress: chat template + tokenize", "event loop",
          lambda r: tokenizer.encode(chat_prompt_text(tokenizer, r), add_special_tokens=False), reqs)
    data = stage("ingress: base64 decode", "thread", lambda u: decode_data_url(u, policy), urls)
    images = stage("ingress: image decode", "thread", lambda d: decode_image(d, policy), data)
    stage(f"ingress: cache key ({digest} of pixels)", "thread", lambda im: image_key(im, router._settings, "bench"),
          images)
    resized = stage("ingress: resize to the patch grid", "thread", processor.resize, images)
    stage(f"ingress: file digest ({digest} of the encoded bytes)", "thread", encoded_digest, data)
    stage(f"ingress: image thread, all ({images[0].width} -> {resized[0].shape[1]} px)", "thread",
          lambda u: router._prepare_image(decode_data_url(u, policy)), urls)
    for image in images:  # the files are known now; with their embeddings cached, a request resending them:
        router.cache.put(image_key(image, router._settings, router.model_id), object(), 1)
    stage("ingress: image thread, a known file with cached embeddings", "thread",
          lambda u: router._prepare_image(decode_data_url(u, policy)), urls)
    chunk = completion_object(True, True, "chatcmpl-x", "bench", 0,
                              [choice_dict(True, True, ChoiceDelta(0, " word", None, None), 0)], None)
    stage("ingress: one SSE token chunk", "event loop", lambda _: sse(chunk), urls)
    line = sse(chunk).strip()
    stage("client: one SSE token chunk parsed", "client", lambda _: json.loads(line[6:]), urls)
    return rows


def main(argv: list[str] | None = None) -> list[tuple[str, str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", default="qwen3_vl", help="a models.tiny architecture (ignored with --ckpt)")
    parser.add_argument("--ckpt", default=None, help="a checkpoint directory with a tokenizer")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--processor", choices=["checkpoint", "published"], default="checkpoint",
                        help="the checkpoint's preprocessor_config.json, or the published Qwen3-VL one")
    opts = parser.parse_args(argv)
    if opts.ckpt:
        ckpt = Path(opts.ckpt)
    else:
        import tempfile

        from models.tiny import write_tiny_checkpoint

        ckpt = Path(write_tiny_checkpoint(opts.tiny, Path(tempfile.mkdtemp(prefix="splitvl-tiny-"))))
    processor_json = None
    if opts.processor == "published":
        import tempfile

        from models.random_weights import PUBLISHED_PREPROCESSOR

        processor_json = Path(tempfile.mkdtemp(prefix="splitvl-pre-")) / "preprocessor_config.json"
        processor_json.write_text(json.dumps(PUBLISHED_PREPROCESSOR))
    out = []
    for kind, make in (("bench (smooth)", make_image_url), ("noisy (photo-sized)", noisy_image_url)):
        urls = [make(opts.image_size, seed) for seed in range(opts.iters)]
        kb = statistics.mean(len(u) for u in urls) / 1024
        print(f"### {kind} {opts.image_size}px JPEG, data URL {kb:.0f} KiB")
        for name, where, ms in time_stages(ckpt, urls, processor_json):
            print(f"| {name} | {where} | {ms:.3f} ms |")
            out.append((f"{kind}: {name}", where, ms))
    return out


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))
    main()
