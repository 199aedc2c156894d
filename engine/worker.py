"""Tensor-parallel ranks as Ray actors, and the executor that drives them.

Each `TPWorker` is one rank: it joins torch.distributed (NCCL on GPU, gloo on
CPU) at a free port picked by rank 0 (no fixed names or ports: several
replicas share a node), builds and loads only its model shard, owns its KV
cache, and runs one `execute(step)` call per engine step. Steps go through a
Ray compiled graph: the pickled step message is written once to a
shared-memory channel every rank reads, and the result comes back the same
way, about a tenth of the host time of one actor task per rank per step
(ray.put + task submission + ray.wait). Steps that carry image embeddings
still go as tasks over the object store: the ranks keep a sequence's
embeddings across steps, and there they map them without a copy, with the
ObjectRef keeping them alive (a channel's buffer is reused by the next step).
`EngineConfig.tp_compiled_graph=False` sends every step as tasks. All ranks sit in one
placement group (STRICT_PACK, one bundle per rank): the one given (the Serve
replica's, passed to an engine process), else inside a Serve replica that
already has a placement group with enough bundles that group, else a new one.

A dead rank is noticed through a `watch()` call parked on every actor (it
returns only by failing when the actor dies), both during a step and from
`is_alive()`, so a killed worker marks the engine unhealthy instead of hanging
the surviving ranks' collectives (they are killed too).
"""

from __future__ import annotations

import datetime
import logging
import pickle
import socket
import os
import threading
import time

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.config import EngineConfig
from engine.step import StepMessage, StepResult
from models.layers.custom_allreduce import CustomAllReduce

log = logging.getLogger(__name__)


def uses_custom_all_reduce(config: EngineConfig) -> bool:
    """The one-shot CUDA IPC all-reduce is asked for and can apply (CUDA, several ranks)."""
    return config.custom_all_reduce and config.device == "cuda" and config.tensor_parallel_size > 1


def visible_index(gpu_id: str, visible: str | None) -> int:
    """The CUDA device index of the GPU Ray calls `gpu_id` in a process that sees
    `visible` (its CUDA_VISIBLE_DEVICES; None: every GPU, in their own order)."""
    if visible is None:
        return int(gpu_id)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if gpu_id not in ids:
        raise RuntimeError(f"GPU {gpu_id} assigned by Ray is not in CUDA_VISIBLE_DEVICES={visible!r}")
    return ids.index(gpu_id)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank died or stopped answering."""


class TPWorker:
    """One tensor-parallel rank (created as a Ray actor by `RayTPExecutor`)."""

    def __init__(self, config: EngineConfig, rank: int):
        self.config = config
        self.rank = rank
        self.runner = None
        self.custom_ar = None
        self._stop = threading.Event()
        if config.device == "cpu":
            torch.set_num_threads(1)

    def pick_address(self) -> tuple[str, int]:
        """Rank 0: this node's address and a port free right now."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, address: str, port: int, max_model_len: int) -> int:
        """Join the TP group, build and load this rank's shard; return the KV blocks it can hold."""
        from engine.runner import ModelRunner
        from models.layers.parallel import ParallelContext

        size = self.config.tensor_parallel_size
        cuda = self.config.device == "cuda"
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(self._device_index())
        dist.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=size,
            timeout=datetime.timedelta(seconds=max(60.0, self.config.step_timeout_s)),
        )
        self.custom_ar = None
        if uses_custom_all_reduce(self.config):
            self.custom_ar = CustomAllReduce.create(dist.group.WORLD, torch.device("cuda", torch.cuda.current_device()))
        parallel = ParallelContext(self.rank, size, dist.group.WORLD, self.custom_ar)
        self.runner = ModelRunner(self.config, parallel)
        return self.runner.profile_num_blocks(max_model_len)

    def _device_index(self) -> int:
        """This actor's GPU: device 0 (Ray shows it only that one), or with the custom
        all-reduce (every GPU of the node visible) the one Ray assigned it."""
        if not uses_custom_all_reduce(self.config):
            return 0
        return visible_index(str(ray.get_gpu_ids()[0]), os.environ.get("CUDA_VISIBLE_DEVICES"))

    def init_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.runner.init_kv_cache(num_blocks, max_model_len)

    def execute(self, msg: StepMessage) -> StepResult | None:
        return self.runner.execute(msg)

    def execute_pickled(self, data: bytes) -> bytes:
        """`execute` for the compiled graph: nothing this rank keeps points into the channel's buffer."""
        return pickle.dumps(self.runner.execute(pickle.loads(data)), protocol=pickle.HIGHEST_PROTOCOL)

    def watch(self) -> None:
        """Parked until shutdown; fails (RayActorError) when this actor dies."""
        self._stop.wait()

    def shutdown(self) -> None:
        self._stop.set()
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        if self.custom_ar is not None:
            self.custom_ar.close()
            self.custom_ar = None
        if dist.is_initialized():
            dist.destroy_process_group()


class RayTPExecutor:
    """Drives `tensor_parallel_size` TPWorker actors; rank 0's result is the step's result.

    Args:
        placement_group: where the ranks go (bundle i holds rank i); None: the current
            task's group if it has enough bundles, else a new STRICT_PACK group owned here.
    """

    def __init__(self, config: EngineConfig, max_model_len: int, placement_group: PlacementGroup | None = None):
        if not ray.is_initialized():
            ray.init()
        self.config = config
        self.timeout = config.step_timeout_s
        self._own_pg = False
        self._dag = None
        self.pg = self._placement_group(config, placement_group)
        self.workers = self._start_workers(config)
        self._watch = [w.watch.remote() for w in self.workers]
        try:
            address, port = self._get(self.workers[0].pick_address.remote(), 60.0)
            blocks = self._get_all([
                w.setup.remote(address, port, max_model_len) for w in self.workers
            ], max(300.0, self.timeout))
            self.num_blocks = min(blocks)
            self._get_all([w.init_cache.remote(self.num_blocks, max_model_len) for w in self.workers], 600.0)
        except Exception:
            self.on_failure()
            raise
        if config.tp_compiled_graph:
            self._dag = self._compile()

    # ---- setup -------------------------------------------------------------------

    def _placement_group(self, config: EngineConfig, given: PlacementGroup | None) -> PlacementGroup:
        if given is not None:
            if len(given.bundle_specs) < config.tensor_parallel_size:
                raise ValueError(f"the placement group has {len(given.bundle_specs)} bundles, "
                                 f"{config.tensor_parallel_size} TP ranks need one each")
            return given
        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) >= config.tensor_parallel_size:
            return current
        bundle = {"GPU": config.gpus_per_rank} if config.device == "cuda" else {"CPU": 1}
        pg = placement_group([dict(bundle) for _ in range(config.tensor_parallel_size)], strategy="STRICT_PACK")
        ready, _ = ray.wait([pg.ready()], timeout=120)
        if not ready:
            remove_placement_group(pg)
            raise WorkerDiedError(
                f"no resources for {config.tensor_parallel_size} x {bundle} on one node (placement group pending)"
            )
        self._own_pg = True
        return pg

    def _start_workers(self, config: EngineConfig) -> list:
        gpu = config.device == "cuda"
        actor = ray.remote(TPWorker)
        # CUDA IPC maps a peer's memory only where its GPU is visible: Ray leaves every GPU
        # visible and each rank picks its own (`TPWorker._device_index`).
        env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if uses_custom_all_reduce(config) else None
        return [
            actor.options(
                num_cpus=0 if gpu else 1,
                num_gpus=config.gpus_per_rank if gpu else 0,  # its bundle's share
                # watch() parks one thread, the compiled graph's loop (or the step tasks) another,
                # and shutdown() needs a third while the loop still runs.
                max_concurrency=3,
                runtime_env={"env_vars": env} if env else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=rank,
                ),
            ).remote(config, rank)
            for rank in range(config.tensor_parallel_size)
        ]

    def _compile(self):
        """The step as a compiled graph (every rank's `execute` on one input), or None."""
        try:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as step:
                dag = MultiOutputNode([w.execute_pickled.bind(step) for w in self.workers])
            return dag.experimental_compile()
        except Exception as exc:  # an older Ray or an unsupported setup: the task path still works
            log.warning("TP steps fall back to one actor task per rank (compiled graph failed: %s: %s)",
                        type(exc).__name__, exc)
            return None

    # ---- calls -------------------------------------------------------------------

    def _get(self, ref, timeout: float):
        return self._get_all([ref], timeout)[0]

    def _get_all(self, refs: list, timeout: float) -> list:
        """Results of `refs`, failing fast when any rank dies or the deadline passes."""
        deadline = time.monotonic() + timeout
        pending = set(refs)
        watch = set(self._watch)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerDiedError(f"a tensor-parallel step took longer than {timeout:.0f} s")
            ready, _ = ray.wait(list(pending) + list(watch), num_returns=1, timeout=min(left, 1.0))
            for ref in ready:
                if ref in watch:
                    raise WorkerDiedError(f"a tensor-parallel worker died: {self._error_of(ref)}")
                ray.get(ref)  # raises the rank's exception, if any
                pending.discard(ref)
        return ray.get(refs)

    @staticmethod
    def _error_of(ref) -> str:
        try:
            ray.get(ref, timeout=0)
        except Exception as exc:  # the actor's death reason
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return "watch() returned"

    def execute(self, msg: StepMessage) -> StepResult | None:
        if self._dag is None or any(seq.mm is not None for seq in msg.new_seqs):
            msg_ref = ray.put(msg)
            refs = [w.execute.remote(msg_ref) for w in self.workers]
            return self._get_all(refs, self.timeout)[0]
        from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayChannelTimeoutError

        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            return pickle.loads(ray.get(self._dag.execute(data), timeout=self.timeout)[0])
        except (GetTimeoutError, RayChannelTimeoutError) as exc:
            raise WorkerDiedError(f"a tensor-parallel step took longer than {self.timeout:.0f} s") from exc
        except (RayActorError, RayChannelError) as exc:
            raise WorkerDiedError(f"a tensor-parallel worker died: {type(exc).__name__}") from exc

    def is_alive(self) -> bool:
        if not self._watch:
            return False
        ready, _ = ray.wait(list(self._watch), num_returns=1, timeout=0)
        return not ready

    def on_failure(self) -> None:
        """Kill every rank (the survivors may be stuck in a collective) and free the group."""
        dag, self._dag = getattr(self, "_dag", None), None
        for w in getattr(self, "workers", []):
            ray.kill(w, no_restart=True)
        if dag is not None:
            try:  # the ranks are gone: this only releases the driver's channels
                dag.teardown()
            except Exception as exc:
                log.debug("compiled graph teardown after failure: %s", exc)
        self.workers = []
        self._watch = []
        if self._own_pg:
            remove_placement_group(self.pg)
            self._own_pg = False

    def shutdown(self) -> None:
        dag, self._dag = self._dag, None
        if dag is not None:
            try:  # stops the ranks' graph loops so that shutdown() below runs on live actors
                dag.teardown()
            except Exception as exc:
                log.warning("compiled graph teardown failed: %s", exc)
        if self.workers:
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
            except Exception:  # already dead: killing below is all that is left
                pass
        self.on_failure()
