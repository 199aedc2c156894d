"""Embedding transfer encoder -> LLM replica through Ray's object store, between two actors.

The source actor does what a VisionEncoder replica does with one image's tower
output: `deployments.vision.split_outputs` (device -> CPU copy, per-image
clone) and returns the `ImageEmbedding`, which Ray puts in the object store.
The sink actor does what an LLMServer does: awaits the ObjectRef, then moves
the tensors to its device. Timed separately on the sink:
- `get`: the object store hop alone (the object is already sealed; `ray.wait`
  with `fetch_local=False` waits for that without pulling it);
- `end to end`: from the driver's `make()` call to the sink holding device
  tensors: two actor calls, the source's device -> CPU copy, the hop and the
  sink's CPU -> device copy.
Payload: one image's embeds + deepstack, `N_tok x hidden x (1 + L)` values,
N_tok = (size / patch / merge)^2, in the serving dtype.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def embedding_shape(config: Any, image_size: int) -> tuple[int, int, int]:
    """(N_tok, out_hidden, deepstack levels L) of one `image_size`^2 image under `ModelConfig` `config`."""
    vision = config.vision
    side = image_size // (vision.patch_size * vision.spatial_merge_size)
    return side * side, vision.out_hidden_size, len(vision.deepstack_visual_indexes)


class EmbeddingSource:
    """Holds one batched tower output on its device; `make()` returns it as the encoder would."""

    def __init__(self, tokens: int, hidden: int, levels: int, dtype: str, device: str):
        self.device = device
        dt = getattr(torch, dtype)
        self.embeds = torch.randn(tokens, hidden, dtype=dt, device=device)
        self.deepstack = torch.randn(levels, tokens, hidden, dtype=dt, device=device)
        self.grid = (1, int(tokens**0.5) * 2, int(tokens**0.5) * 2)

    def make(self) -> Any:
        from deployments.vision import split_outputs

        return split_outputs(self.embeds, self.deepstack, [self.grid], merge_unit=4)[0]


class EmbeddingSink:
    """Fetches embeddings as an LLM replica does and times each part."""

    def __init__(self, device: str):
        self.device = device

    def fetch(self, refs: list) -> dict[str, float]:
        import ray

        ray.wait(refs, fetch_local=False)
        start = time.perf_counter()
        emb = ray.get(refs[0])
        got = time.perf_counter()
        embeds, deepstack = emb.embeds.to(self.device), emb.deepstack.to(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        done = time.perf_counter()
        nbytes = embeds.numel() * embeds.element_size() + deepstack.numel() * deepstack.element_size()
        return {"get_s": got - start, "to_device_s": done - got, "done_at": time.time(), "bytes": nbytes}


def measure_transfer(
    tokens: int, hidden: int, levels: int, dtype: str, gpus: tuple[float, float] = (0.0, 0.0),
    iters: int = 10,
) -> dict[str, float]:
    """Median transfer times and rates for one image's embeddings. Needs `ray.init` done.

    Args:
        gpus: GPU shares of the source and sink actors (0: CPU tensors).
    """
    import ray

    src_dev = "cuda" if gpus[0] > 0 else "cpu"
    dst_dev = "cuda" if gpus[1] > 0 else "cpu"
    source = ray.remote(EmbeddingSource).options(num_cpus=0, num_gpus=gpus[0]).remote(
        tokens, hidden, levels, dtype, src_dev)
    sink = ray.remote(EmbeddingSink).options(num_cpus=0, num_gpus=gpus[1]).remote(dst_dev)
    gets, ends, nbytes = [], [], 0
    try:
        for i in range(iters + 2):
            start = time.time()
            ref = source.make.remote()
            out = ray.get(sink.fetch.remote([ref]))
            del ref
            if i >= 2:  # the first calls pay for actor start and lazy CUDA init
                gets.append(out["get_s"])
                ends.append(out["done_at"] - start)
                nbytes = out["bytes"]
    finally:
        ray.kill(source)
        ray.kill(sink)
    get_s, end_s = statistics.median(gets), statistics.median(ends)
    return {
        "bytes": nbytes,
        "get_ms": get_s * 1e3,
        "get_gb_s": nbytes / get_s / 1e9,
        "end_to_end_ms": end_s * 1e3,
        "end_to_end_gb_s": nbytes / end_s / 1e9,
        "source_device": src_dev,
        "sink_device": dst_dev,
    }
