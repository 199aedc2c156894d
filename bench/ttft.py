"""In-process time to first token for one image request: transformers, and our engine.LLM.

Both take the same request the HTTP benchmark sends (chat template of one image
+ the question, through the checkpoint's tokenizer) and the same decoded
image, and are timed from the decoded image to the first generated token:
preprocessing (our processor, on the CPU, for both), the vision tower, the
prefill and one sampled token. Median of `iters` after two warmup runs.
"""

from __future__ import annotations

import base64
import inspect
import statistics
import time
from pathlib import Path

import torch

from bench.common import load_hf_model, synchronize
from bench.load import QUESTION, make_image_url


def request_inputs(ckpt: Path, image_size: int) -> tuple[list[int], object]:
    """(prompt ids with one `<|image_pad|>`, the decoded PIL image) of the benchmark's chat request."""
    from transformers import AutoTokenizer

    from models.processor import load_image

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    data = base64.b64decode(make_image_url(image_size, seed=10**6).split(",", 1)[1])
    return ids, load_image(data)


def median_ms(fn, device: torch.device, iters: int) -> float:
    """Median wall ms of `fn` (device synchronized around each call) over `iters` runs after two warmups."""
    samples = []
    for i in range(iters + 2):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= 2:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def hf_ttft_ms(ckpt: Path, image_size: int, device: torch.device, dtype: torch.dtype, iters: int = 5) -> float:
    """transformers `generate(max_new_tokens=1)` on one image request, preprocessing included."""
    from models.processor import ImageProcessor

    ids, image = request_inputs(ckpt, image_size)
    processor = ImageProcessor.from_pretrained(ckpt)
    model = load_hf_model(ckpt, dtype, device)
    pad = model.config.image_token_id
    wants_types = "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters

    @torch.inference_mode()
    def run() -> None:
        processed = processor.preprocess([image])
        count = processor.num_image_tokens(processed.grid_thw[0])
        full = [x for t in ids for x in ([t] * count if t == pad else [t])]
        input_ids = torch.tensor([full], device=device)
        kwargs = {"pixel_values": processed.pixel_values.to(device, dtype),
                  "image_grid_thw": processed.grid_thw.to(device)}
        if wants_types:  # newer transformers place image tokens' mRoPE positions only when told
            kwargs["mm_token_type_ids"] = (input_ids == pad).int()
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1,
                       do_sample=False, pad_token_id=0, **kwargs)

    try:
        return median_ms(run, device, iters)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def ours_ttft_ms(ckpt: Path, image_size: int, device: torch.device, dtype: str, iters: int = 5,
                 **engine_kwargs) -> float:
    """Our offline `engine.LLM` (vision tower + engine in this process) on the same request."""
    from engine import LLM, SamplingParams

    ids, image = request_inputs(ckpt, image_size)
    llm = LLM(model=str(ckpt), device=device.type, dtype=dtype, skip_tokenizer_init=True, **engine_kwargs)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    try:
        return median_ms(lambda: llm.generate([{"prompt_token_ids": ids, "images": [image]}], params), device,
                          iters)
    finally:
        llm.shutdown()
        del llm
        if device.type == "cuda":
            torch.cuda.empty_cache()
