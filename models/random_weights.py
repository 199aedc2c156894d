"""Random weights of a real architecture: saved as HF saves them, or made in place.

`write_random_checkpoint(configs/models/qwen3-vl-2b.json, out_dir)` builds
transformers' own model class from that config.json with random init (on
`device`, in `dtype`) and `save_pretrained`s it, plus `generation_config.json`
and the published Qwen3-VL `preprocessor_config.json` values, so our loader,
processor and the HF reference read the same directory. No tokenizer is
written: benchmarks feed token ids. `write_config_files` writes the same
directory without the weights (for `load_format: dummy`).

`init_random_weights(module, std)` fills one of our modules in place on its
device with the same init rule (`load_format: dummy`, bench/moe.py): a model too
large for the disk still runs with the numbers of a freshly initialised one.

CLI: `python -m models.random_weights configs/models/qwen3-vl-2b.json OUT [--device cuda] [--dtype bfloat16]`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    _write_side_files(data, out)
    return out


def write_config_files(config_json: str | Path, out_dir: str | Path) -> Path:
    """`out_dir` as `write_random_checkpoint` writes it, less the weights: config.json,
    generation_config.json and (VL) preprocessor_config.json, for `load_format: dummy`."""
    data = json.loads(Path(config_json).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    _write_side_files(data, out)
    return out


def _write_side_files(data: dict[str, Any], out: Path) -> None:
    text = data.get("text_config", data)
    eos = text.get("eos_token_id", data.get("eos_token_id"))
    gen = {"eos_token_id": eos if isinstance(eos, list) else [eos] if eos is not None else []}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if "vision_config" in data:
        (out / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PREPROCESSOR, indent=2) + "\n")


def init_random_weights(module: nn.Module, std: float, seed: int = 0, rank: int = 0) -> None:
    """Fill every parameter of `module` in place, on its device, as transformers' `_init_weights`
    initialises these families.

    - matrices (>= 2-D: linear, embedding, LM head, conv, MoE router and stacked experts, the
      vision patch and position embeddings) ~ N(0, std);
    - biases 0; Gated DeltaNet `dt_bias` 1 and `A_log` = log(U(0.01, 16));
    - every other vector is a norm weight: 1 (our Qwen3.5 `OffsetRMSNorm` holds 1 + w, transformers
      initialises w to 0).

    Args:
        std: the config's `initializer_range` (text or vision).
        seed, rank: parameters every TP rank holds whole (the MoE router, the shared-expert gate)
            come from a generator seeded by `seed` alone, so all ranks agree on them; a TP shard
            comes from one seeded by `seed` and `rank`, so ranks hold different slices as shards of
            one random model would. They are not the slices of the TP=1 model: TP=2 != TP=1.
    """
    params = list(module.parameters())
    if not params:
        return
    device = params[0].device
    whole = torch.Generator(device=device).manual_seed(seed)
    shard = torch.Generator(device=device).manual_seed(seed + 1_000_003 * (rank + 1))
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rpartition(".")[2]
            gen = shard if _is_shard(param) else whole
            if leaf == "A_log":
                param.uniform_(0.01, 16.0, generator=gen).log_()
            elif leaf == "bias":
                param.zero_()
            elif param.dim() >= 2:
                param.normal_(0.0, std, generator=gen)
            else:  # norm weights and dt_bias
                param.fill_(1.0)


def _is_shard(param: nn.Parameter) -> bool:
    """Whether `param` is this rank's slice of a larger checkpoint tensor. Parameters without a
    `shard_spec` are loaded by their module (the stacked experts, split over ranks) or are norms."""
    spec_of = getattr(param, "shard_spec", None)
    if spec_of is None:
        return True
    return math.prod(spec_of().full_shape) != param.numel()


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
