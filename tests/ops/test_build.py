"""ops.build: cache keying, fallback to the references, and the CUDA compile check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ops
from ops import build

REPO = Path(__file__).resolve().parents[2]


def _clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without splitvl switches other tests may have set, plus overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ("SPLITVL_REFERENCE_OPS", "SPLITVL_BUILD_CUDA")}
    return {**env, **overrides}


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code], cwd=REPO, env=_clean_env(**env),
        capture_output=True, text=True, timeout=600,
    )


def test_build_dir_keyed_by_torch_version_backend_and_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVL_OPS_BUILD_DIR", str(tmp_path))
    plan = build.plan_build(cuda=False)
    assert plan.build_dir.parent == tmp_path
    assert plan.build_dir.name.startswith(f"{torch.__version__.replace('+', '_')}-cpu-")
    assert not any(s.suffix == ".cu" for s in plan.sources)
    assert (build.CSRC / "torch_bindings.cpp") in plan.sources
    cuda_plan = build.plan_build(cuda=True)
    assert "-cuda-" in cuda_plan.build_dir.name and cuda_plan.build_dir != plan.build_dir
    assert {s for s in cuda_plan.sources if s.suffix == ".cu"} == set((build.CSRC / "cuda").glob("*.cu"))


def test_hopper_arch_list_builds_9_0_as_9_0a():
    """The wgmma attention kernel needs sm_90a; other architectures are kept."""
    assert build.hopper_arch_list("9.0") == "9.0a"
    assert build.hopper_arch_list("8.0;9.0+PTX") == "8.0;9.0a+PTX"
    assert build.hopper_arch_list("8.6 9.0 10.0") == "8.6;9.0a;10.0"
    assert build.hopper_arch_list("9.0a;12.0") == "9.0a;12.0"


def test_import_falls_back_to_references_with_one_warning(tmp_path):
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import ops\n"
        "mine = [w for w in caught if 'splitvl ops extension unavailable' in str(w.message)]\n"
        "assert len(mine) == 1, [str(w.message) for w in caught]\n"
        "assert not ops.extension_available() and 'ExtensionBuildError' in ops.fallback_reason()\n"
        "x = torch.randn(3, 8)\n"
        "torch.testing.assert_close(ops.rms_norm(x, torch.ones(8), 1e-6), ops.reference.rms_norm(x, torch.ones(8), 1e-6))\n"
        "print('fallback ok')\n"
    )
    # A compiler that always fails, in an empty build root, breaks the build.
    result = _python(code, CXX="/bin/false", SPLITVL_OPS_BUILD_DIR=str(tmp_path), SPLITVL_BUILD_CUDA="0")
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr[-3000:]


def test_reference_ops_env_skips_the_build(tmp_path):
    code = "import ops; assert not ops.extension_available(); print(ops.fallback_reason())"
    result = _python(code, SPLITVL_REFERENCE_OPS="1", SPLITVL_OPS_BUILD_DIR=str(tmp_path))
    assert result.returncode == 0 and "SPLITVL_REFERENCE_OPS" in result.stdout, result.stderr[-3000:]
    assert not any(tmp_path.iterdir())  # nothing was compiled


@pytest.mark.slow
def test_cuda_sources_compile():
    """`python -m ops.build --cuda` compiles every .cu file (no GPU needed); CI runs this."""
    root = Path(os.environ.get("SPLITVL_OPS_BUILD_DIR") or Path.home() / ".cache" / "splitvl" / "ops")
    # SPLITVL_BUILD_CUDA=1 makes `import ops` build the CUDA library itself (no CPU-only build first).
    env = _clean_env(SPLITVL_OPS_BUILD_DIR=str(root / "cuda-check"), SPLITVL_BUILD_CUDA="1",
                     MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    result = subprocess.run(
        [sys.executable, "-m", "ops.build", "--cuda"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=3000,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "cpu+cuda" in result.stdout
    for bound in ops.OPS:  # every op has its CPU and CUDA kernel registered
        assert re.search(rf"splitvl::{bound.name} +CPU, CUDA", result.stdout), result.stdout
