"""Local Ray + Serve for the deployment tests: one per module, few CPUs, a free HTTP port."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.deployments.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serve_instance():
    """Start Ray (4 logical CPUs) and Serve on a free port; yields the base URL."""
    import ray
    from ray import serve

    os.environ.setdefault("SPLITVL_REFERENCE_OPS", "1")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"SPLITVL_REFERENCE_OPS": "1", "PYTHONPATH": str(REPO),
                                  "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.2):
    """Poll `predicate` until it returns a truthy value; returns it or fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)
