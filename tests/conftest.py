"""Shared pytest fixtures: tiny checkpoints and the GPU marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory: `tiny_checkpoint("qwen3_vl")` -> directory of a tiny HF checkpoint.

    Each architecture is written once per test session (seed 0) through
    transformers' own classes by `models.tiny`.
    """
    from models.tiny import write_tiny_checkpoint

    cache: dict[tuple[str, int], Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            cache[key] = Path(write_tiny_checkpoint(arch, out, seed=seed))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def weightless_checkpoint(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """Factory: `weightless_checkpoint("qwen3_vl")` -> the tiny checkpoint's directory without its
    safetensors (config, tokenizer, preprocessor files): what `load_format: dummy` serves."""
    import shutil

    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"weightless-{arch}") / arch
            shutil.copytree(tiny_checkpoint(arch), out, ignore=shutil.ignore_patterns("*.safetensors*"))
            cache[arch] = out
        return cache[arch]

    return make
