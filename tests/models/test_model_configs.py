"""The benchmark architectures (configs/models/*.json) load into our model with transformers' parameter count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.config import model_config_from_hf
from models.layers.parallel import SINGLE
from models.registry import build_language_model

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "models").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_language_model_matches_transformers_parameter_count(path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    data = json.loads(path.read_text())
    with torch.device("meta"):
        hf = getattr(transformers, data["architectures"][0])(transformers.AutoConfig.for_model(**data))
        ours = build_language_model(model_config_from_hf(data), SINGLE, torch.bfloat16, torch.device("meta"))
    # Tied embeddings are one tensor in both; named_parameters lists it once.
    hf_text = sum(p.numel() for n, p in hf.named_parameters() if ".visual." not in f".{n}")
    assert sum(p.numel() for p in ours.parameters()) == hf_text


def test_every_benchmark_config_names_its_source() -> None:
    sources = (CONFIGS[0].parent / "SOURCES.md").read_text()
    for path in CONFIGS:
        assert f"`{path.name}`" in sources, f"{path.name} has no entry in configs/models/SOURCES.md"
