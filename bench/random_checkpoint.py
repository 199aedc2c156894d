"""Random-weight checkpoints of real architectures, written as HF writes them.

Benchmarks run ours and transformers on the same weights: transformers builds
the model from `configs/models/<name>.json` with random init, `save_pretrained`
writes safetensors, and our loader reads that directory. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def config_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no architecture config {path.name}; known: {known}")
    return path


def hf_config(name: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(**json.loads(config_path(name).read_text()))


def build_hf_model(name: str, dtype: torch.dtype, device: str | torch.device, vision_only: bool = False):
    """Instantiate transformers' model of architecture `name` with random weights."""
    import transformers

    config = hf_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        if vision_only:
            vision_cls = getattr(transformers, config.architectures[0].replace("ForConditionalGeneration", "VisionModel"))
            model = vision_cls._from_config(config.vision_config, dtype=dtype)
        else:
            model_cls = getattr(transformers, config.architectures[0])
            model = model_cls._from_config(config, dtype=dtype)
    return model.eval()


def write_checkpoint(model, name: str, out_dir: str | Path, prefix: str = "") -> Path:
    """Save `model` in HF's safetensors layout; `prefix` re-roots a sub-module (e.g. "model.visual.")."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_path(name), out / "config.json")
    if prefix:
        tensors = {prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(out, safe_serialization=True)
        shutil.copy(config_path(name), out / "config.json")
    return out
