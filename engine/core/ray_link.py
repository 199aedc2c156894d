"""How an engine process with TP > 1 joins its replica's Ray cluster.

The engine process is spawned, not a Ray worker: it connects as a driver of its own job
(the parent's GCS address and namespace; Ray's auth settings come with the inherited
environment) and creates the TP worker actors, which it then owns, in the parent's
placement group. Ray kills actors whose owner died, so the workers end with the engine
process. The parent's runtime env goes to that job too: the workers get what they would
have got as the replica's own children (env vars, PYTHONPATH, working dir).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RayLink:
    """What the engine process needs to join the parent's Ray cluster (picklable).

    placement_group: the parent's (a Serve replica's: one bundle per rank) or None (the
    executor then makes its own).
    """

    address: str
    namespace: str
    runtime_env: dict[str, Any] | None
    placement_group: Any  # ray.util.placement_group.PlacementGroup | None

    @classmethod
    def current(cls) -> RayLink:
        """The calling process' cluster (started here first if it is not connected, as `Engine` does)."""
        import ray
        from ray.util.placement_group import get_current_placement_group

        if not ray.is_initialized():
            ray.init()
        ctx = ray.get_runtime_context()
        env = ctx.runtime_env
        return cls(ctx.gcs_address, ctx.namespace, dict(env) if env else None, get_current_placement_group())

    def connect(self) -> None:
        """Join the cluster from the engine process (a driver; its workers' logs stay in Ray's files)."""
        import ray

        ray.init(address=self.address, namespace=self.namespace, runtime_env=self.runtime_env,
                 log_to_driver=False)
