"""Safetensors checkpoint reading and weight loading (never unpickles anything).

`CheckpointReader(model_dir)` reads single-file (`model.safetensors`) and
sharded (`model.safetensors.index.json`) checkpoints; `read(key, dim, start,
length)` goes through `safe_open(...).get_slice`, so a TP rank reads only its
slice. `load_module(module, reader, key_of)` fills every parameter of a module,
driven by the module's parameters (so a parameter that got nothing is an
error naming it and its checkpoint key):

- a parameter in a module named like a key of `PACKED_MODULES_MAPPING`
  (`qkv_proj`, `gate_up_proj`, `in_proj`) is read from its unfused
  checkpoint keys (`q_proj/k_proj/v_proj`, `gate_proj/up_proj`,
  `in_proj_qkv/in_proj_z/in_proj_b/in_proj_a`) unless the checkpoint holds
  the fused key itself;
- a module with `load_checkpoint(reader, key_prefix)` loads its own
  parameters (the MoE experts, whose checkpoint layouts vary);
- otherwise the parameter's own `shard_spec` / `weight_loader` (see
  `models.layers.linear`) say which slice to read and where to put it; a
  parameter without them is read whole and must match in shape.

`fill_weights(module, model_dir, load_format, std)` is what replicas call: "auto"
reads the safetensors as above, "dummy" makes random weights in place on the
module's device (`models.random_weights.init_random_weights`) and needs no weight
files at all, only config.json (benchmarks of shapes whose checkpoint would not
fit the disk, smoke tests).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from models.layers.linear import ShardId

PackedModules = dict[str, list[tuple[str, ShardId]]]
PACKED_MODULES_MAPPING: PackedModules = {
    "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
    "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    # Gated DeltaNet's one input GEMM [q | k | v | z | b | a]; the checkpoint's in_proj_qkv holds three parts.
    "in_proj": [("in_proj_qkv", (0, 1, 2)), ("in_proj_z", 3), ("in_proj_b", 4), ("in_proj_a", 5)],
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LOAD_FORMATS = ("auto", "dummy")


class CheckpointError(ValueError):
    """The checkpoint is unusable: wrong format, a missing or mis-shaped tensor."""


class CheckpointReader:
    """Read tensors (or slices of them) from a safetensors checkpoint directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._file_of = self._index(self.model_dir)
        self._handles: dict[str, Any] = {}

    @staticmethod
    def _index(model_dir: Path) -> dict[str, str]:
        if not model_dir.is_dir():
            raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
            missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names missing shard files: {missing}")
            return dict(weight_map)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{model_dir} holds only pickle checkpoints {pickles}; splitvl loads safetensors "
                    "only (pickle files can run code on load). Convert with safetensors first."
                )
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
        file_of: dict[str, str] = {}
        for path in files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    file_of[key] = path.name
        return file_of

    def _handle(self, key: str) -> Any:
        name = self._file_of.get(key)
        if name is None:
            raise CheckpointError(f"missing tensor {key} in checkpoint {self.model_dir}")
        if name not in self._handles:
            self._handles[name] = safe_open(self.model_dir / name, framework="pt")
        return self._handles[name]

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def has(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """The tensor `key`, or its slice `[start, start + length)` along `dim`."""
        handle = self._handle(key)
        if dim is None:
            return handle.get_tensor(key)
        tensor_slice = handle.get_slice(key)
        shape = tensor_slice.get_shape()
        if not 0 <= dim < len(shape):
            raise CheckpointError(f"tensor {key} of shape {list(shape)} has no dim {dim}")
        length = shape[dim] - start if length is None else length
        if start < 0 or length < 0 or start + length > shape[dim]:
            raise CheckpointError(
                f"tensor {key} of shape {list(shape)}: slice [{start}, {start + length}) of dim {dim} out of range"
            )
        index = tuple(slice(None) for _ in range(dim)) + (slice(start, start + length),)
        return tensor_slice[index]


def load_module(
    module: nn.Module,
    reader: CheckpointReader,
    key_of: Callable[[str], str],
    packed: PackedModules = PACKED_MODULES_MAPPING,
) -> list[str]:
    """Load every parameter of `module`; returns the checkpoint keys read.

    Args:
        key_of: parameter name in `module` (e.g. `layers.0.mlp.down_proj.weight`)
            -> checkpoint key (e.g. `model.language_model.layers.0.mlp.down_proj.weight`).
        packed: fused module name -> [(checkpoint module name, shard_id)].
    Raises:
        CheckpointError naming the key of a missing or mis-shaped tensor.
    """
    keys: list[str] = []
    custom = [name for name, m in module.named_modules() if name and hasattr(m, "load_checkpoint")]
    for name in custom:
        keys += module.get_submodule(name).load_checkpoint(reader, key_of(name + "."))
    for name, param in module.named_parameters():
        if any(name.startswith(prefix + ".") for prefix in custom):
            continue
        keys += _load_param(name, param, reader, key_of, packed)
    return keys


def _load_param(
    name: str, param: nn.Parameter, reader: CheckpointReader,
    key_of: Callable[[str], str], packed: PackedModules,
) -> list[str]:
    module_path, _, leaf_param = name.rpartition(".")
    parent, _, module_name = module_path.rpartition(".")
    fused_key = key_of(name)
    if module_name in packed and not reader.has(fused_key):
        keys = []
        for sub, shard_id in packed[module_name]:
            key = key_of(".".join(p for p in (parent, sub, leaf_param) if p))
            _load_tensor(param, reader, key, shard_id)
            keys.append(key)
        return keys
    _load_tensor(param, reader, fused_key, None)
    return [fused_key]


def _load_tensor(param: nn.Parameter, reader: CheckpointReader, key: str, shard_id: ShardId) -> None:
    if not reader.has(key):
        raise CheckpointError(f"missing tensor {key} in checkpoint {reader.model_dir}")
    shape = reader.shape(key)
    spec_of = getattr(param, "shard_spec", None)
    spec = spec_of(shard_id) if spec_of is not None else None
    expected = spec.full_shape if spec is not None else tuple(param.shape)
    if shape != tuple(expected):
        raise CheckpointError(f"tensor {key} has shape {list(shape)}, expected {list(expected)}")
    loaded = reader.read(key) if spec is None else reader.read(key, spec.dim, spec.start, spec.length)
    loader = getattr(param, "weight_loader", None)
    try:
        if loader is None:
            param.data.copy_(loaded)
        else:
            loader(param, loaded, shard_id)
    except ValueError as exc:
        raise CheckpointError(f"tensor {key}: {exc}") from exc


def language_model_prefix(reader: CheckpointReader) -> str:
    """`model.language_model.` (VL checkpoints) or `model.` (text-only checkpoints)."""
    for prefix in ("model.language_model.", "model."):
        if reader.has(prefix + "embed_tokens.weight"):
            return prefix
    raise CheckpointError(
        "missing tensor model.language_model.embed_tokens.weight (nor model.embed_tokens.weight) "
        f"in checkpoint {reader.model_dir}"
    )


def load_language_model(model: nn.Module, reader: CheckpointReader) -> list[str]:
    """Load a decoder laid out as `model.*` (embed_tokens, layers, norm) + `lm_head.*`.

    The decoder keys come from `model.language_model.*` or `model.*`, whichever
    the checkpoint has; `lm_head.*` stays as is. A tied head shares the
    embedding parameter, so it is loaded once from the embedding key.
    """
    prefix = language_model_prefix(reader)

    def key_of(name: str) -> str:
        return prefix + name[len("model."):] if name.startswith("model.") else name

    return load_module(model, reader, key_of)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters on its device (this TP rank's shards)."""
    return sum(p.nbytes for p in module.parameters())


def fill_weights(
    module: nn.Module, model_dir: str | Path, load_format: str, std: float, seed: int = 0, rank: int = 0,
) -> None:
    """Fill a decoder or vision tower (anything with `load_weights(reader)`).

    Args:
        load_format: "auto" reads the safetensors of `model_dir`; "dummy" draws random weights
            in place (see `init_random_weights`; `seed`, `rank` pick the TP rank's values).
        std: the config's `initializer_range` for "dummy".
    Raises:
        ValueError for an unknown `load_format`; CheckpointError for an unusable checkpoint.
    """
    if load_format == "dummy":
        from models.random_weights import init_random_weights

        init_random_weights(module, std, seed, rank)
    elif load_format == "auto":
        module.load_weights(CheckpointReader(model_dir))
    else:
        raise ValueError(f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
