"""engine.log_setup: the engine's startup lines (weights, KV cache) reach stderr in a process that
configured splitvl's logging (a Serve replica, and the engine process it starts), at the level
SPLITVL_LOG_LEVEL names; a script using the engine as a library keeps its own logging. Each case runs
in a fresh interpreter, so this session's logging is untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from engine.engine import Engine, EngineConfig
from engine.log_setup import configure_logging, configured_level

mode = sys.argv[2]
if mode != "library":
    configure_logging()
    configure_logging()  # twice: still one handler
    print("level", configured_level(), file=sys.stderr)
config = EngineConfig(model=sys.argv[1], dtype="float32", device="cpu", max_model_len=256, num_gpu_blocks=32,
                      max_num_seqs=4)
if mode == "process":
    from engine.core import EngineProcess
    EngineProcess(config).shutdown()
else:
    Engine(config)
"""


def _stderr(checkpoint: Path, mode: str, level: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SPLITVL_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if level is not None:
        env["SPLITVL_LOG_LEVEL"] = level
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint), mode], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.timeout(900)
def test_startup_lines_where_configured(tiny_checkpoint):
    ckpt = tiny_checkpoint("qwen3_vl")
    replica = _stderr(ckpt, "engine")
    assert "level INFO" in replica
    weights = [line for line in replica.splitlines() if "engine.runner: Qwen3VLForConditionalGeneration weights" in line]
    assert len(weights) == 1 and "GiB) on cpu in" in weights[0], replica[-2000:]
    assert replica.count("engine.runner: KV cache: 32 blocks of 16 tokens (512 tokens") == 1, replica[-2000:]
    # the engine process started from a configured one logs there too, at the parent's level
    child = _stderr(ckpt, "process")
    assert child.count("engine.runner: KV cache: 32 blocks") == 1, child[-2000:]
    assert "engine.runner" not in _stderr(ckpt, "process", level="warning")
    assert "engine.runner" not in _stderr(ckpt, "library")
