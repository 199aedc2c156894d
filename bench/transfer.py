"""Embedding transfer encoder -> LLM replica between two actors: object store and CUDA IPC.

The source actor does what a VisionEncoder replica does with one image's tower
output: either `deployments.vision.split_outputs` (device -> CPU copy) returning an
`ImageEmbedding` that Ray puts in the object store, or a copy into a slot of its
`EmbeddingPool` returning an `IpcEmbedding` handle. The sink actor does what an
LLMServer does: awaits the ObjectRef, then makes the embeddings its own device tensors
(`PoolReader.fetch`: a CPU -> device copy, or the pool opened once and a device ->
device copy, slot marked done); or this process is the sink, as the ingress replica of
`llm.colocate_ingress` is: it owns the vision call's result and runs the engine, so
the result comes back to it with no third process to tell. Timed separately on the sink:
- `get`: the object store hop alone (the object is already sealed; `ray.wait`
  with `fetch_local=False` waits for that without pulling it);
- `end to end`: from the driver's `make()` call to the sink holding device
  tensors: two actor calls, the source's copy, the hop and the sink's copy;
- `from output`: from the source holding the tower output (its `make()` starting)
  to the sink holding device tensors: the transfer proper, without the driver's
  call that stands in for the request to encode (same node, one clock).
Payload: one image's embeds + deepstack, `N_tok x hidden x (1 + L)` values,
N_tok = (size / patch / merge)^2, in the serving dtype.

`python -m bench.transfer` prints a row per way and sink for a model's shapes on this
machine (IPC needs a GPU: both ends on one GPU).
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

    def __init__(self, tokens: int, hidden: int, levels: int, dtype: str, device: str, pool_mb: int = 0):
        self.device = device
        dt = getattr(torch, dtype)
        self.embeds = torch.randn(tokens, hidden, dtype=dt, device=device)
        self.deepstack = torch.randn(levels, tokens, hidden, dtype=dt, device=device)
        self.grid = (1, int(tokens**0.5) * 2, int(tokens**0.5) * 2)
        self.pool = None
        if pool_mb and device == "cuda":
            import ray

            from deployments.embedding_pool import EmbeddingPool

            self.pool = EmbeddingPool.on_device(pool_mb * 2**20, torch.device("cuda", torch.cuda.current_device()),
                                                ray.get_runtime_context().get_node_id(), lease_s=60.0)

    def make(self, transfer: str = "object_store") -> Any:
        from deployments.vision import split_outputs

        self.started_at = time.time()
        if transfer == "ipc":
            handle = self.pool.store(self.embeds, self.deepstack, self.grid)
            if handle is None:
                raise RuntimeError("the pool is full: the sink does not release its slots")
            torch.cuda.current_stream().synchronize()
            return handle
        return split_outputs(self.embeds, self.deepstack, [self.grid], merge_unit=4)[0]

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embeds.cpu(), self.deepstack.cpu()

    def last_start(self) -> float:
        """When the last `make()` started (`time.time()`)."""
        return self.started_at

    def reclaim(self) -> int:
        """Slots freed now (released by the sink); the pool is empty afterwards when all were released."""
        freed = self.pool.allocator.reclaim()
        return freed if self.pool.allocator.bytes_in_use() == 0 else -1


class EmbeddingSink:
    """Fetches embeddings as an LLM replica does and times each part."""

    def __init__(self, device: str):
        import ray

        from deployments.embedding_pool import PoolReader

        self.device = device
        target = torch.device("cuda", torch.cuda.current_device()) if device.startswith("cuda") else None
        self.reader = PoolReader(ray.get_runtime_context().get_node_id(), target)

    def fetch(self, refs: list) -> dict[str, float]:
        import ray

        ray.wait(refs, fetch_local=False)
        start = time.perf_counter()
        emb = ray.get(refs[0])
        got = time.perf_counter()
        embeds, deepstack = self._own(emb)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        done = time.perf_counter()
        nbytes = embeds.numel() * embeds.element_size() + deepstack.numel() * deepstack.element_size()
        return {"get_s": got - start, "to_device_s": done - got, "done_at": time.time(), "bytes": nbytes}

    def values(self, refs: list) -> tuple[torch.Tensor, torch.Tensor]:
        import ray

        embeds, deepstack = self._own(ray.get(refs[0]))
        return embeds.cpu(), deepstack.cpu()

    def _own(self, emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from deployments.embedding_transfer import IpcEmbedding

        if isinstance(emb, IpcEmbedding):
            emb = self.reader.fetch(emb)
            return emb.embeds, emb.deepstack
        return emb.embeds.to(self.device), emb.deepstack.to(self.device)


def measure_transfer(
    tokens: int, hidden: int, levels: int, dtype: str, gpus: tuple[float, float] = (0.0, 0.0),
    iters: int = 10, transfer: str = "object_store", sink_owns: bool = False,
) -> dict[str, float]:
    """Median transfer times and rates for one image's embeddings. Needs `ray.init` done.

    Args:
        gpus: GPU shares of the source and sink actors (0: CPU tensors).
        transfer: "object_store" or "ipc" (both actors on one GPU).
        sink_owns: the sink is this process, which owns the source's result (as the ingress
            replica of `llm.colocate_ingress` owns the vision call's result and runs the engine),
            instead of a third actor that is handed the reference.
    """
    import ray

    src_dev = "cuda" if gpus[0] > 0 else "cpu"
    dst_dev = "cuda" if gpus[1] > 0 else "cpu"
    pool_mb = 4 * tokens * hidden * (1 + levels) * getattr(torch, dtype).itemsize // 2**20 + 1
    source = ray.remote(EmbeddingSource).options(num_cpus=0, num_gpus=gpus[0]).remote(
        tokens, hidden, levels, dtype, src_dev, pool_mb if transfer == "ipc" else 0)
    if sink_owns:
        sink, fetch = None, EmbeddingSink(dst_dev).fetch
    else:
        sink = ray.remote(EmbeddingSink).options(num_cpus=0, num_gpus=gpus[1]).remote(dst_dev)
        fetch = lambda refs: ray.get(sink.fetch.remote(refs))  # noqa: E731
    gets, ends, froms, nbytes = [], [], [], 0
    try:
        for i in range(iters + 2):
            start = time.time()
            ref = source.make.remote(transfer)
            out = fetch([ref])
            del ref
            if i >= 2:  # the first calls pay for actor start, lazy CUDA init and the IPC open
                gets.append(out["get_s"])
                ends.append(out["done_at"] - start)
                froms.append(out["done_at"] - ray.get(source.last_start.remote()))
                nbytes = out["bytes"]
    finally:
        ray.kill(source)
        if sink is not None:
            ray.kill(sink)
    get_s, end_s, from_s = statistics.median(gets), statistics.median(ends), statistics.median(froms)
    return {
        "transfer": transfer,
        "sink": "owner" if sink_owns else "actor",
        "bytes": nbytes,
        "get_ms": get_s * 1e3,
        "get_gb_s": nbytes / get_s / 1e9,
        "end_to_end_ms": end_s * 1e3,
        "end_to_end_gb_s": nbytes / end_s / 1e9,
        "from_output_ms": from_s * 1e3,
        "from_output_gb_s": nbytes / from_s / 1e9,
        "source_device": src_dev,
        "sink_device": dst_dev,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    import argparse
    import shutil
    import tempfile
    from pathlib import Path

    import ray

    from bench.common import config_path, print_table
    from models.config import load_model_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-vl-8b", help="configs/models/<name>.json gives the shapes")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # load_model_config reads a checkpoint directory
        shutil.copy(config_path(opts.model), Path(tmp) / "config.json")
        tokens, hidden, levels = embedding_shape(load_model_config(tmp), opts.image_size)
    cuda = torch.cuda.is_available()
    gpus, dtype = ((0.5, 0.5), "bfloat16") if cuda else ((0.0, 0.0), "float32")
    ray.init(num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False)
    try:
        rows = [measure_transfer(tokens, hidden, levels, dtype, gpus, opts.iters, transfer, owns)
                for transfer in (("object_store", "ipc") if cuda else ("object_store",))
                for owns in (False, True)]
    finally:
        ray.shutdown()
    print_table(f"Embedding transfer, one {opts.image_size}px image of {opts.model} "
                f"({tokens} tokens x {hidden} x {1 + levels}, {dtype})",
                ["transfer", "sink", "devices", "MB", "get ms", "end to end ms", "end to end GB/s", "from output ms",
                 "from output GB/s"],
                [[r["transfer"], r["sink"], f"{r['source_device']} -> {r['sink_device']}", r["bytes"] / 1e6, r["get_ms"],
                  r["end_to_end_ms"], r["end_to_end_gb_s"], r["from_output_ms"], r["from_output_gb_s"]]
                 for r in rows])
    return rows


if __name__ == "__main__":
    main()
