"""splitvl's own log lines in Serve replicas and the engine process.

Ray Serve sets up the `ray.serve` logger only: our modules' loggers (`engine`, `deployments`,
`models`, `ops`) propagate to a root logger without handlers, where Python's last-resort handler
prints WARNING and above and drops the rest, so the engine's startup lines (weights loaded, KV
cache size, CUDA graphs captured, with their seconds) never showed. `configure_logging` gives
those loggers one stderr handler (Ray forwards a replica's stderr to the driver and its log
files) at `SPLITVL_LOG_LEVEL` (default INFO), as vLLM logs its startup. Library use (`engine.LLM`
in a script) keeps the caller's logging configuration: the replicas call it, and an engine
process started from one (`configured_level`, handed to `engine.core.child.run`).
"""

from __future__ import annotations

import logging
import os
import sys

PACKAGES = ("engine", "deployments", "models", "ops")
LEVEL_ENV = "SPLITVL_LOG_LEVEL"
_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


class _Handler(logging.StreamHandler):
    """The one handler `configure_logging` adds (found again by its type: calls are idempotent)."""


def configure_logging(level: str | None = None) -> None:
    """Route the splitvl packages' records at `level` (default: `SPLITVL_LOG_LEVEL`, else INFO) and
    above to stderr, once per process."""
    name = (level or os.environ.get(LEVEL_ENV) or "INFO").strip().upper()
    number = logging.getLevelName(name)
    if not isinstance(number, int):
        number = logging.INFO
        logging.getLogger("engine").warning("%s=%r is not a log level; using INFO", LEVEL_ENV, name)
    for package in PACKAGES:
        logger = logging.getLogger(package)
        logger.setLevel(number)
        if not any(isinstance(h, _Handler) for h in logger.handlers):
            handler = _Handler(sys.stderr)
            handler.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(handler)
        logger.propagate = False


def configured_level() -> str | None:
    """The level `configure_logging` set in this process, or None where it was not called."""
    logger = logging.getLogger(PACKAGES[0])
    if not any(isinstance(h, _Handler) for h in logger.handlers):
        return None
    return logging.getLevelName(logger.level)
