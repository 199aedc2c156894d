"""Local Ray + Serve for the deployment tests: one per module, few CPUs, a free HTTP port."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from tests.deployments.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def local_serve(num_cpus: int = 4, include_dashboard: bool = False):
    """Start Ray (`num_cpus` logical CPUs) and Serve on a free port; yields the base URL."""
    import ray
    from ray import serve

    os.environ.setdefault("SPLITVL_REFERENCE_OPS", "1")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        log_to_driver=False,
        runtime_env={"env_vars": {"SPLITVL_REFERENCE_OPS": "1", "PYTHONPATH": str(REPO),
                                  "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def serve_instance():
    """Ray (4 logical CPUs) and Serve for one test module; yields the base URL."""
    with local_serve(num_cpus=4) as url:
        yield url


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
