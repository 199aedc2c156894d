"""TP ranks on GPU shares (`llm.gpus_per_worker` > 0.5 with tensor_parallel_size > 1), placed by a real Ray.

A local Ray cluster that declares 2 GPUs (no GPU is needed for Ray to assign GPU ids):
the placement group `LLMServer.deployment_options` asks for, one actor per rank asking
that rank's share as `RayTPExecutor` does, then vision replicas asking their share. With
0.8 per rank the ranks get different GPUs and two 0.2 vision replicas fit beside them on
the same 2 GPUs; with whole GPUs per rank (the old rule) the vision replica cannot be placed.
"""

from __future__ import annotations

import pytest

from deployments.config import AppConfig
from deployments.llm import LLMServer, engine_config_values
from engine.config import EngineConfig

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_gpu_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Probe:
    def gpu_ids(self) -> list:
        return [str(i) for i in ray.get_gpu_ids()]


def _place(tmp_path, gpus_per_worker: float, vision_gpus: float, vision_replicas: int):
    """(GPU ids of each rank, whether every vision replica was placed within a few seconds)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = AppConfig.model_validate({"model": str(tmp_path), "device": "cuda", "llm": {
        "tensor_parallel_size": 2, "num_cpus": 1, "gpus_per_worker": gpus_per_worker}})
    opts = LLMServer.deployment_options(cfg)
    share = engine_config_values(cfg, "m")["gpus_per_rank"]  # what each TPWorker asks (engine/worker.py)
    pg = placement_group(opts["placement_group_bundles"], strategy=opts["placement_group_strategy"])
    vision = []
    try:
        assert ray.get(pg.ready(), timeout=30)
        ranks = [Probe.options(num_gpus=share, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=i)).remote() for i in range(2)]
        ids = ray.get([r.gpu_ids.remote() for r in ranks], timeout=30)
        vision = [Probe.options(num_gpus=vision_gpus).remote() for _ in range(vision_replicas)]
        ready, _ = ray.wait([v.gpu_ids.remote() for v in vision], num_returns=len(vision), timeout=5)
        return ids, len(ready) == len(vision)
    finally:
        for actor in vision:
            ray.kill(actor)
        remove_placement_group(pg)


def test_ranks_on_shares_leave_room_for_vision_on_the_same_two_gpus(two_gpu_cluster, tmp_path):
    ids, vision_placed = _place(tmp_path, 0.8, 0.2, 2)
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    assert vision_placed


def test_whole_gpu_ranks_leave_no_room_for_vision(two_gpu_cluster, tmp_path):
    ids, vision_placed = _place(tmp_path, 1.0, 0.2, 1)
    assert ids[0] != ids[1]
    assert not vision_placed


def test_engine_config_refuses_shares_two_ranks_could_split():
    with pytest.raises(ValueError, match="two ranks never share a GPU"):
        EngineConfig(model="m", gpus_per_rank=0.5)
