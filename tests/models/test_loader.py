"""Checkpoint reading/loading: layouts, sharding, bad checkpoints, TP slices."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import load_model_config
from models.layers.parallel import ParallelContext
from models.loader import CheckpointError, CheckpointReader
from models.qwen3 import Qwen3ForCausalLM
from models.qwen3_5 import Qwen3_5ForCausalLM

LM = "model.language_model."


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(model_dir)
    return {k: reader.read(k) for k in reader.keys()}


def _rewrite(
    src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    shards: int = 1,
) -> Path:
    """Copy a checkpoint's non-weight files and its (edited) tensors into `shards` files."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.startswith("model.safetensors"):
            shutil.copy(f, dst / f.name)
    tensors = _tensors(src)
    tensors = edit(tensors) if edit else tensors
    if shards == 1:
        save_file(tensors, dst / "model.safetensors")
        return dst
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, dst / name)
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _load(model_dir: Path, parallel: ParallelContext | None = None, reader=None) -> Qwen3ForCausalLM:
    model = Qwen3ForCausalLM(load_model_config(model_dir), parallel)
    model.load_weights(reader or CheckpointReader(model_dir))
    return model


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_sharded_checkpoint_loads_identically(tiny_checkpoint, tmp_path, arch: str) -> None:
    src = tiny_checkpoint(arch)
    sharded = _rewrite(src, tmp_path / "sharded", shards=4)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    _assert_same_params(_load(src), _load(sharded))
    # And the values are the checkpoint's own.
    model, tensors = _load(sharded), _tensors(src)
    torch.testing.assert_close(model.model.norm.weight, tensors[LM + "norm.weight"])
    q = model.model.layers[1].self_attn.qkv_proj.weight[: 4 * 16]
    torch.testing.assert_close(q, tensors[LM + "layers.1.self_attn.q_proj.weight"])


@pytest.mark.parametrize("key", [LM + "layers.1.self_attn.k_proj.weight", LM + "layers.2.mlp.experts.down_proj",
                                 LM + "norm.weight", "lm_head.weight"])
def test_missing_tensor_names_the_key(tiny_checkpoint, tmp_path, key: str) -> None:
    bad = _rewrite(tiny_checkpoint("qwen3_vl_moe"), tmp_path, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        _load(bad)


@pytest.mark.parametrize("key", [LM + "layers.0.self_attn.q_norm.weight", LM + "layers.0.self_attn.v_proj.weight",
                                 LM + "layers.1.mlp.experts.gate_up_proj", LM + "embed_tokens.weight"])
def test_wrong_shape_names_the_key(tiny_checkpoint, tmp_path, key: str) -> None:
    def edit(t):
        t[key] = torch.zeros(*[s + 1 for s in t[key].shape])
        return t

    bad = _rewrite(tiny_checkpoint("qwen3_vl_moe"), tmp_path, edit)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".*shape"):
        _load(bad)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(_Boom.marker),))


def test_pickle_checkpoint_is_refused_without_unpickling(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("qwen3_vl")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    _Boom.marker = str(tmp_path / "unpickled")
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Boom()}))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors only"):
        CheckpointReader(tmp_path)
    assert not (tmp_path / "unpickled").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")


def test_index_naming_a_missing_shard_is_refused(tiny_checkpoint, tmp_path) -> None:
    sharded = _rewrite(tiny_checkpoint("qwen3_vl"), tmp_path, shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        CheckpointReader(sharded)


def test_tied_and_untied_heads(tiny_checkpoint, tmp_path) -> None:
    # Dense tiny ties the head: it must use the embedding even with no lm_head key.
    tied_dir = _rewrite(tiny_checkpoint("qwen3_vl"), tmp_path / "tied",
                        lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    tied = _load(tied_dir)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    embed = _tensors(tied_dir)[LM + "embed_tokens.weight"]
    hidden = torch.randn(3, embed.shape[1])
    torch.testing.assert_close(tied.compute_logits(hidden), hidden @ embed.T)
    # MoE tiny does not tie: the head is its own tensor, and required.
    untied_dir = tiny_checkpoint("qwen3_vl_moe")
    untied, tensors = _load(untied_dir), _tensors(untied_dir)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    torch.testing.assert_close(untied.lm_head.weight, tensors["lm_head.weight"])
    assert not torch.equal(tensors["lm_head.weight"], tensors[LM + "embed_tokens.weight"])


def _per_expert(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in t.items():
        if key.endswith("experts.gate_up_proj"):
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e].contiguous()
                out[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e].contiguous()
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                out[key.replace("down_proj", f"{e}.down_proj.weight")] = value[e].contiguous()
        else:
            out[key] = value
    return out


def _transposed(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
            for k, v in t.items()}


@pytest.mark.parametrize("layout", [_per_expert, _transposed], ids=["per_expert", "fused_transposed"])
def test_expert_layouts_load_identically(tiny_checkpoint, tmp_path, layout) -> None:
    src = tiny_checkpoint("qwen3_vl_moe")
    other = _rewrite(src, tmp_path, layout)
    with safe_open(other / "model.safetensors", "pt") as f:
        if layout is _per_expert:
            assert LM + "layers.0.mlp.experts.7.up_proj.weight" in f.keys()
        else:  # [E, H, 2I] as the published checkpoints store it
            assert f.get_slice(LM + "layers.0.mlp.experts.gate_up_proj").get_shape() == [8, 64, 48]
    _assert_same_params(_load(src), _load(other))


class RecordingReader(CheckpointReader):
    """Records (key, shape of what was read) for every read."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.reads: list[tuple[str, tuple[int, ...]]] = []

    def read(self, key, dim=None, start=0, length=None):
        tensor = super().read(key, dim, start, length)
        self.reads.append((key, tuple(tensor.shape)))
        return tensor


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_tp_rank_reads_only_its_slices(tiny_checkpoint, arch: str) -> None:
    src = tiny_checkpoint(arch)
    full = CheckpointReader(src)
    whole = _load(src)
    sharded_parts = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "embed_tokens", "lm_head", "experts.gate_up_proj", "experts.down_proj")
    for rank in range(2):
        reader = RecordingReader(src)
        model = _load(src, ParallelContext(rank, 2), reader)
        assert reader.reads and not any(key.startswith("model.visual.") for key, _ in reader.reads)
        for key, shape in reader.reads:
            n_full = torch.Size(full.shape(key)).numel()
            n_read = torch.Size(shape).numel()
            if any(part in key for part in sharded_parts):
                # Experts' gate_up is read as two halves (gate, up) of this rank's rows.
                assert n_read * (4 if key.endswith("gate_up_proj") else 2) == n_full, (key, shape)
            else:
                assert n_read == n_full, key
        # The rank's q rows are the matching half of the full model's q rows.
        q_rows = model.model.layers[0].self_attn.qkv_proj.q_size
        torch.testing.assert_close(
            model.model.layers[0].self_attn.qkv_proj.weight[:q_rows],
            whole.model.layers[0].self_attn.qkv_proj.weight[rank * q_rows : (rank + 1) * q_rows],
        )


@pytest.mark.parametrize("tp", [1, 2])
def test_gated_delta_net_in_proj_is_the_checkpoint_parts(tiny_checkpoint, tp: int) -> None:
    """Each rank's fused in_proj = its slice of each checkpoint part, in order q, k, v, z, b, a."""
    src = tiny_checkpoint("qwen3_5")
    config, reader = load_model_config(src), CheckpointReader(src)
    text = config.text
    key_dim = text.linear_num_key_heads * text.linear_key_head_dim
    value_dim = text.linear_num_value_heads * text.linear_value_head_dim
    linear = [i for i, kind in enumerate(text.layer_types) if kind == "linear_attention"]
    assert linear
    for rank in range(tp):
        model = Qwen3_5ForCausalLM(config, ParallelContext(rank, tp))
        model.load_weights(reader)
        for i in linear:
            prefix = f"{LM}layers.{i}.linear_attn.in_proj_"
            q, k, v = reader.read(prefix + "qkv.weight").split([key_dim, key_dim, value_dim])
            parts = [q, k, v, *(reader.read(prefix + p + ".weight") for p in "zba")]
            expected = torch.cat([part.chunk(tp)[rank] for part in parts])
            torch.testing.assert_close(model.model.layers[i].linear_attn.in_proj.weight, expected, rtol=0, atol=0)
