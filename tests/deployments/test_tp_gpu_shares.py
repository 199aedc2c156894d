"""TP ranks on GPU shares (`llm.gpus_per_worker` > 0.5 with tensor_parallel_size > 1), placed by a real Ray.

A local Ray cluster that declares 2 GPUs (no GPU is needed for Ray to assign GPU ids):
the placement group `LLMServer.deployment_options` asks for, one actor per rank asking
that rank's share as `RayTPExecutor` does, and vision replicas asking theirs. With shares
over 0.5 the ranks get different GPUs and vision replicas fit beside them on the same 2
GPUs; with whole GPUs per rank (the old rule) no vision replica can be placed.

Ray packs fractional GPU requests best-fit (onto the fullest GPU they fit): vision
replicas started before the LLM's placement group all land on one GPU, so a rank's share
plus every vision share that may start first must stay within 1. Each shipped TP YAML is
placed here: its first vision replicas before the LLM replica, the rest after it, then
the LLM replica replaced (a TP worker died) beside them all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.app import vision_options
from deployments.config import AppConfig, args_from_serve_yaml
from deployments.llm import LLMServer, engine_config_values
from engine.config import EngineConfig

ray = pytest.importorskip("ray")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TP_YAMLS = ["qwen3-vl-8b-tp2.yaml", "qwen3-vl-30b-a3b-tp2.yaml", "bench/serve-tp2.yaml",
            "bench/serve-tp2-process.yaml", "cluster/rayservice.yaml"]
PENDING_S = 3.0  # how long a request that cannot be placed is given (it stays pending)


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


def _tp_config(tmp_path, gpus_per_worker: float) -> AppConfig:
    return AppConfig.model_validate({"model": str(tmp_path), "device": "cuda", "llm": {
        "tensor_parallel_size": 2, "num_cpus": 1, "gpus_per_worker": gpus_per_worker}})


def _rank_group(cfg: AppConfig):
    """The LLM replica's placement group as Serve builds it from the deployment options."""
    from ray.util.placement_group import placement_group

    opts = LLMServer.deployment_options(cfg)
    return placement_group(opts["placement_group_bundles"], strategy=opts["placement_group_strategy"])


def _vision(share: float, n: int) -> list:
    """n vision-replica stand-ins asking `share` of a GPU, as one-bundle placement groups: Ray places
    those best-fit on a GPU as it places actors (the test below shows it with actors) and starts no
    process for them, which keeps these tests to seconds."""
    from ray.util.placement_group import placement_group

    return [placement_group([{"GPU": share}]) for _ in range(n)]


def _all_ready(groups: list) -> bool:
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=PENDING_S)
    return len(ready) == len(groups)


def _cleanup(actors: list, groups: list) -> None:
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        ray.kill(actor)
    for pg in groups:
        remove_placement_group(pg)


def test_ranks_get_different_gpus_and_leave_room_for_vision(two_gpu_cluster, tmp_path):
    """0.6 per rank: each rank actor (asking its share as RayTPExecutor's TPWorker does) sees one GPU of
    its own, and four 0.2 vision replicas fit beside them on the same 2 GPUs."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = _tp_config(tmp_path, 0.6)
    share = engine_config_values(cfg, "m")["gpus_per_rank"]
    groups, actors = [_rank_group(cfg)], []
    try:
        assert ray.get(groups[0].ready(), timeout=30)
        actors = [Probe.options(num_gpus=share, scheduling_strategy=PlacementGroupSchedulingStrategy(
            groups[0], placement_group_bundle_index=i)).remote() for i in range(2)]
        ids = ray.get([r.gpu_ids.remote() for r in actors], timeout=60)
        assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
        groups += _vision(0.2, 4)
        assert _all_ready(groups[1:])
    finally:
        _cleanup(actors, groups)


def test_whole_gpu_ranks_leave_no_room_for_vision(two_gpu_cluster, tmp_path):
    groups = [_rank_group(_tp_config(tmp_path, 1.0))]
    try:
        assert _all_ready(groups)
        groups += _vision(0.2, 1)
        assert not _all_ready(groups[1:])
    finally:
        _cleanup([], groups)


def test_vision_started_first_packs_one_gpu_and_can_block_large_rank_shares(two_gpu_cluster, tmp_path):
    """Two 0.2 vision replicas (actors) first share one GPU (best fit): 0.8 ranks then cannot both be
    placed, 0.6 can."""
    actors = [Probe.options(num_gpus=0.2).remote() for _ in range(2)]
    groups: list = []
    try:
        first, second = ray.get([a.gpu_ids.remote() for a in actors], timeout=60)
        assert first == second
        groups = [_rank_group(_tp_config(tmp_path, 0.8))]
        assert not _all_ready(groups)
        _cleanup([], groups)
        groups = [_rank_group(_tp_config(tmp_path, 0.6))]
        assert _all_ready(groups)
    finally:
        _cleanup(actors, groups)


def _shipped_args(name: str) -> dict:
    data = yaml.safe_load((CONFIGS / name).read_text())
    if "spec" in data:  # a RayService: the Serve config is a YAML string inside
        data = yaml.safe_load(data["spec"]["serveConfigV2"])
    return args_from_serve_yaml(data)


@pytest.mark.parametrize("name", TP_YAMLS)
def test_shipped_tp_yaml_fits_two_gpus_in_any_order(two_gpu_cluster, tmp_path, name):
    """Its first vision replicas placed before the LLM replica, then the rest of its vision replicas, then
    the LLM replica replaced (its placement group removed and asked again) while they all run."""
    cfg = AppConfig.model_validate({**_shipped_args(name), "model": str(tmp_path)})
    assert cfg.llm.tensor_parallel_size == 2 and 0.5 < cfg.llm.gpus_per_worker < 1
    opts = vision_options(cfg)
    share, scaling = opts["ray_actor_options"]["num_gpus"], opts.get("autoscaling_config")
    first = opts["num_replicas"] if scaling is None else scaling.get("initial_replicas") or scaling["min_replicas"]
    most = opts["num_replicas"] if scaling is None else scaling["max_replicas"]
    vision = _vision(share, first)
    groups: list = []
    try:
        assert _all_ready(vision), "the first vision replicas"
        groups = [_rank_group(cfg)]
        assert _all_ready(groups), "the LLM replica after the first vision replicas"
        vision += _vision(share, most - first)
        assert _all_ready(vision), f"{most} vision replicas beside the LLM replica"
        _cleanup([], groups)
        groups = [_rank_group(cfg)]
        assert _all_ready(groups), "the LLM replica replaced beside every vision replica"
    finally:
        _cleanup([], vision + groups)


def test_engine_config_refuses_shares_two_ranks_could_split():
    with pytest.raises(ValueError, match="two ranks never share a GPU"):
        EngineConfig(model="m", gpus_per_rank=0.5)
