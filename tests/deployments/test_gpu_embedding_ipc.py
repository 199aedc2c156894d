"""GPU-only: embeddings from one Ray actor's pool reach another actor on the same GPU by CUDA IPC.

The producer (bench.transfer.EmbeddingSource, as a vision replica: `EmbeddingPool`) and the
consumer (EmbeddingSink, as an LLM replica: `PoolReader`) are separate processes holding
half a GPU each. The consumer's copy must equal the producer's tensors, its slot must come
back to the producer without a Ray call, and a handle read after its slot was reused must be
refused (the router then re-encodes).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.timeout(300)
def test_ipc_handle_copies_equal_and_slot_comes_back():
    import ray

    from bench.transfer import EmbeddingSink, EmbeddingSource
    from deployments.embedding_transfer import IpcEmbedding

    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tokens, hidden, levels = 256, 1024, 3
        pool_mb = 2 * tokens * hidden * (1 + levels) * 2 // 2**20 + 1  # room for two images, not three
        source = ray.remote(EmbeddingSource).options(num_cpus=0, num_gpus=0.5).remote(
            tokens, hidden, levels, "bfloat16", "cuda", pool_mb)
        sink = ray.remote(EmbeddingSink).options(num_cpus=0, num_gpus=0.5).remote("cuda")
        want_e, want_d = ray.get(source.values.remote())
        for _ in range(3):  # more images than the pool holds: each released slot is reused
            ref = source.make.remote("ipc")
            assert isinstance(ray.get(ref), IpcEmbedding)
            got_e, got_d = ray.get(sink.values.remote([ref]))
            assert torch.equal(got_e, want_e) and torch.equal(got_d, want_d)
        assert ray.get(source.reclaim.remote()) >= 1  # every slot released by the sink, the pool empty
        stale = source.make.remote("ipc")
        ray.get(sink.values.remote([stale]))  # read and released
        ray.get(source.make.remote("ipc"))
        ray.get(source.make.remote("ipc"))  # the pool is full only if the stale slot was reused
        with pytest.raises(ray.exceptions.RayTaskError, match="evicted"):
            ray.get(sink.values.remote([stale]))
    finally:
        ray.shutdown()
