"""Random weights of a real architecture, saved as HF saves them (no download).

`write_random_checkpoint(configs/models/qwen3-vl-2b.json, out_dir)` builds
transformers' own model class from that config.json with random init (on
`device`, in `dtype`) and `save_pretrained`s it, plus `generation_config.json`
and the published Qwen3-VL `preprocessor_config.json` values, so our loader,
processor and the HF reference read the same directory. No tokenizer is
written: benchmarks feed token ids.

CLI: `python -m models.random_weights configs/models/qwen3-vl-2b.json OUT [--device cuda] [--dtype bfloat16]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from models.architectures import ARCHITECTURES
from models.config import UnsupportedArchitectureError

# Published Qwen3-VL / Qwen3.5 image preprocessing (patch 16, merge 2).
PUBLISHED_PREPROCESSOR: dict[str, Any] = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_hf_model(
    config_json: str | Path | dict[str, Any],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    """transformers' model for the architecture in `config_json`, random init, eval mode."""
    import transformers

    data = config_json if isinstance(config_json, dict) else json.loads(Path(config_json).read_text())
    arch = (data.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(arch)
    hf_config = transformers.AutoConfig.for_model(**data)
    model_cls = getattr(transformers, arch)
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_cls._from_config(hf_config, dtype=dtype)
    finally:
        torch.random.set_rng_state(rng_state)
    return model.eval()


def write_random_checkpoint(
    config_json: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Path:
    """Write a random-weight checkpoint of the architecture in `config_json`.

    Args:
        config_json: an HF config.json (e.g. `configs/models/qwen3-vl-2b.json`).
        out_dir: created if missing.
        dtype: parameter dtype of the saved tensors.
        device: where to initialize (a GPU makes multi-billion-parameter init fast).
        seed: torch seed for the init.
    Returns:
        `out_dir` as a Path.
    """
    data = json.loads(Path(config_json).read_text())
    model = build_hf_model(data, dtype=dtype, device=device, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    del model
    text = data.get("text_config", data)
    eos = text.get("eos_token_id", data.get("eos_token_id"))
    gen = {"eos_token_id": eos if isinstance(eos, list) else [eos] if eos is not None else []}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if "vision_config" in data:
        (out / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PREPROCESSOR, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_json", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_random_checkpoint(args.config_json, args.out, _DTYPES[args.dtype], args.device, args.seed))


if __name__ == "__main__":
    main()
