"""Vision tower parity with transformers' own tower loaded from the same checkpoint.

fp32 on CPU against the tiny checkpoints (embeddings and every deepstack level,
relative error <= 1e-4); bf16 on CUDA against a random-weight tower of the real
Qwen3-VL-2B vision config (<= 2e-2). Runs on whatever `ops` provides (compiled
kernels or, with SPLITVL_REFERENCE_OPS=1, the references).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from models.config import load_model_config, vision_config_from_hf
from models.loader import CheckpointError, CheckpointReader
from models.processor import ImageProcessor
from models.config import ConfigError
from models.qwen3_vl.vision import (
    ATTENTION_BACKENDS,
    Qwen3VLVisionModel,
    VisionInputError,
    frame_geometry,
)

REPO = Path(__file__).resolve().parents[2]
HF_CLASSES = {
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def hf_forward(visual: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor):
    """(embeds, [deepstack levels]) from transformers' tower, across its output styles."""
    out = visual(pixels, grid_thw=grid)
    if isinstance(out, tuple):
        return out[0], list(out[1]) if len(out) > 1 else []
    return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])


class RecordingReader:
    """A CheckpointReader that records every key it is asked about, optionally hiding some."""

    def __init__(self, reader: CheckpointReader, hidden: tuple[str, ...] = ()):
        self.reader, self.hidden, self.seen = reader, set(hidden), set()
        self.model_dir = reader.model_dir

    def keys(self):
        return [k for k in self.reader.keys() if k not in self.hidden]

    def has(self, key: str) -> bool:
        self.seen.add(key)
        return key not in self.hidden and self.reader.has(key)

    def shape(self, key: str):
        self.seen.add(key)
        return self.reader.shape(key)

    def read(self, key: str, *args, **kwargs) -> torch.Tensor:
        self.seen.add(key)
        if key in self.hidden:
            raise CheckpointError(f"missing tensor {key}")
        return self.reader.read(key, *args, **kwargs)


@pytest.fixture(scope="module")
def towers(tiny_checkpoint):
    """Factory: arch -> (checkpoint dir, our fp32 tower, transformers' fp32 tower)."""
    import transformers

    cache = {}

    def make(arch: str):
        if arch not in cache:
            path = tiny_checkpoint(arch)
            ours = Qwen3VLVisionModel(load_model_config(path).vision, torch.float32, "cpu")
            ours.load_weights(CheckpointReader(path))
            hf_cls = getattr(transformers, HF_CLASSES[arch])
            hf = hf_cls.from_pretrained(path, dtype=torch.float32).model.visual.eval()
            cache[arch] = (path, ours, hf)
        return cache[arch]

    return make


def random_image(height: int, width: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_parity(ours, hf, pixels: torch.Tensor, grid: torch.Tensor, tol: float = 1e-4) -> None:
    with torch.inference_mode():
        embeds, deepstack = ours(pixels, grid)
        ref_embeds, ref_deepstack = hf_forward(hf, pixels, grid)
    tokens = int(grid.prod(-1).sum()) // ours.config.merge_unit
    assert embeds.shape == (tokens, ours.config.out_hidden_size)
    assert embeds.dtype == deepstack.dtype == ours.dtype
    assert deepstack.shape == (len(ref_deepstack), tokens, ours.config.out_hidden_size)
    assert len(ref_deepstack) == len(ours.config.deepstack_visual_indexes)
    assert rel_err(embeds, ref_embeds) <= tol
    for level, ref in enumerate(ref_deepstack):
        assert rel_err(deepstack[level], ref) <= tol, f"deepstack level {level}"


def test_rotary_matches_hf_apply_rotary_pos_emb_vision(towers):
    """ops.rotary_embedding with our positions/cache == transformers' 2-D vision rotary."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as hf_mod

    _, ours, hf = towers("qwen3_vl")
    # The last grid is wider than the rotary table allocated up front: it must grow.
    grid = torch.tensor([[1, 4, 6], [2, 8, 4], [1, 12, 10], [1, 2, 1030]])
    meta = ours.grid_cache.get(tuple(tuple(g) for g in grid.tolist()))
    n, heads, d = int(grid.prod(-1).sum()), ours.config.num_heads, ours.config.head_dim
    q, k = torch.randn(2, n, heads, d).unbind(0)
    if hasattr(hf, "rot_pos_emb"):  # transformers <= 5.1x
        emb = hf.rot_pos_emb(grid)
        emb = torch.cat([emb, emb], dim=-1)
        cos, sin = emb.cos(), emb.sin()
    else:
        from transformers.vision_utils import get_vision_position_ids

        positions = get_vision_position_ids(grid, ours.config.spatial_merge_size)
        cos, sin = hf.rotary_pos_emb(q, positions)
    ref_q, ref_k = hf_mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    assert ours.grid_cache.rotary.max_position >= 1030
    ours.grid_cache.rotary(meta.rotary_positions, q, k)  # ops.rotary_embedding, sections [d/4, d/4]
    torch.testing.assert_close(q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)


def test_one_image_from_processor(towers):
    path, ours, hf = towers("qwen3_vl")
    batch = ImageProcessor.from_pretrained(path).preprocess(random_image(96, 160, seed=1))
    assert batch.grid_thw.tolist() == [[1, 6, 10]]
    assert_parity(ours, hf, batch.pixel_values, batch.grid_thw)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_two_images_of_different_sizes_from_processor(towers, arch):
    path, ours, hf = towers(arch)
    images = [random_image(64, 96, seed=2), random_image(128, 64, seed=3)]
    batch = ImageProcessor.from_pretrained(path).preprocess(images)
    assert batch.grid_thw.tolist() == [[1, 4, 6], [1, 8, 4]]
    assert_parity(ours, hf, batch.pixel_values, batch.grid_thw)


def test_frames_and_grids_larger_than_the_position_table(towers):
    """t > 1 (one attention segment per frame) and grids beyond the 8x8 learned table."""
    _, ours, hf = towers("qwen3_vl")
    grid = torch.tensor([[2, 12, 10], [1, 2, 2], [1, 4, 18]])
    generator = torch.Generator().manual_seed(4)
    pixels = torch.randn(int(grid.prod(-1).sum()), ours.config.patch_dim, generator=generator)
    assert_parity(ours, hf, pixels, grid)


def test_qwen3_5_tower_without_deepstack(towers):
    path, ours, hf = towers("qwen3_5")
    images = [random_image(64, 96, seed=5), random_image(128, 64, seed=6)]
    batch = ImageProcessor.from_pretrained(path).preprocess(images)
    assert_parity(ours, hf, batch.pixel_values, batch.grid_thw)


@pytest.mark.parametrize("backend", [b for b in ATTENTION_BACKENDS if b != "splitvl"])
@pytest.mark.parametrize("grid", [[[1, 4, 6], [1, 4, 6], [1, 4, 6]], [[2, 12, 10], [1, 2, 2], [1, 4, 18]]],
                         ids=["equal frames", "mixed frames"])
def test_torch_attention_backends_match_transformers(towers, backend, grid):
    """The tower on torch's attention kernels (equal frames: one batched SDPA call; mixed: packed
    or one call per frame) == transformers, as the default `ops.varlen_attention` is."""
    _, ours, hf = towers("qwen3_vl")
    grid = torch.tensor(grid)
    pixels = torch.randn(int(grid.prod(-1).sum()), ours.config.patch_dim, generator=torch.Generator().manual_seed(7))
    default = ours.blocks[0].attn.backend
    try:
        ours.set_attention_backend(backend)
        assert {block.attn.backend for block in ours.blocks} == {backend}
        assert_parity(ours, hf, pixels, grid)
    finally:
        ours.set_attention_backend(default)


def test_attention_backend_names_are_checked(towers, monkeypatch):
    from models.qwen3_vl import vision

    _, ours, _ = towers("qwen3_vl")
    monkeypatch.delenv("SPLITVL_VIT_ATTN", raising=False)
    assert vision.VisionAttention(16, 2).backend == "auto"
    with pytest.raises(ValueError, match="attention backend"):
        ours.set_attention_backend("fa9")
    monkeypatch.setenv("SPLITVL_VIT_ATTN", "fa9")
    with pytest.raises(ConfigError, match="SPLITVL_VIT_ATTN"):
        vision.VisionAttention(16, 2)
    monkeypatch.setenv("SPLITVL_VIT_ATTN", "sdpa")
    assert vision.VisionAttention(16, 2).backend == "sdpa"


def test_repeated_grids_reuse_the_cached_metadata(towers):
    _, ours, _ = towers("qwen3_vl")
    grids = ((1, 4, 6), (1, 8, 4))
    assert ours.grid_cache.get(grids) is ours.grid_cache.get(grids)
    indices, weights, positions = frame_geometry(4, 6, side=8, merge=2)
    # Merge-block order: the first 4 patches are the top-left 2x2 block.
    assert positions[:, :4].tolist() == [[0, 0, 1, 1], [0, 1, 0, 1]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(24))


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_load_weights_reads_only_visual_keys(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    reader = RecordingReader(CheckpointReader(path))
    model = Qwen3VLVisionModel(load_model_config(path).vision, torch.float32, "cpu")
    model.load_weights(reader)
    assert reader.seen, "load_weights read nothing"
    assert all(key.startswith("model.visual.") for key in reader.seen), sorted(reader.seen)
    visual = {k for k in CheckpointReader(path).keys() if k.startswith("model.visual.")}
    assert visual <= reader.seen  # every checkpoint tensor of the tower is used


def test_missing_tensor_is_named(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_vl")
    hidden = ("model.visual.blocks.2.attn.qkv.bias", "model.visual.deepstack_merger_list.1.norm.weight")
    model = Qwen3VLVisionModel(load_model_config(path).vision, torch.float32, "cpu")
    with pytest.raises(CheckpointError) as excinfo:
        model.load_weights(RecordingReader(CheckpointReader(path), hidden))
    for key in hidden:
        assert key in str(excinfo.value)


def test_bad_inputs_raise_typed_errors(towers):
    _, ours, _ = towers("qwen3_vl")
    dim = ours.config.patch_dim
    cases = [
        (torch.randn(24, dim + 1), torch.tensor([[1, 4, 6]])),  # wrong patch dim
        (torch.randn(23, dim), torch.tensor([[1, 4, 6]])),  # patch count mismatch
        (torch.randn(15, dim), torch.tensor([[1, 3, 5]])),  # not a multiple of the merge size
        (torch.randn(24, dim), torch.tensor([1, 4, 6])),  # grid not [n, 3]
        (torch.randn(24, dim), torch.tensor([[1.0, 4.0, 6.0]])),  # float grid
        (torch.randn(0, dim), torch.zeros(0, 3, dtype=torch.int64)),  # no images
        (torch.randn(24, dim), torch.tensor([[0, 4, 6]])),  # empty temporal grid
    ]
    for pixels, grid in cases:
        with pytest.raises(VisionInputError):
            ours(pixels, grid)


def norm_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| (bf16 comparisons, where single elements round coarsely)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).norm() / ref.norm()).item()


def compare_real_config_tower(tmp_path: Path, device: str, grid: torch.Tensor,
                              backend: str = "auto") -> dict[str, list[float]]:
    """Random-weight tower of configs/models/qwen3-vl-2b.json in bf16: ours vs transformers'.

    transformers' tower is built with random init (1-D parameters perturbed so
    norms and biases are not constants), saved as `model.visual.*` safetensors
    and loaded by our tower. Returns relative errors [embeds, deepstack...] of
    ours vs transformers' bf16 tower ("vs_hf"), and of each bf16 tower vs
    transformers' tower in fp32 with the same weights ("ours_vs_fp32", "hf_vs_fp32").
    """
    import transformers
    from safetensors.torch import save_file
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as HFVision

    config_path = REPO / "configs" / "models" / "qwen3-vl-2b.json"
    if not config_path.is_file():
        pytest.skip(f"{config_path} not written yet")
    data = json.loads(config_path.read_text())
    vision_config = transformers.AutoConfig.for_model(**data).vision_config
    torch.manual_seed(0)
    with torch.device(device):
        hf = HFVision._from_config(vision_config, dtype=torch.bfloat16).eval()
        for param in hf.parameters():
            if param.ndim == 1:
                param.data.add_(0.1 * torch.randn_like(param))
    tensors = {f"model.visual.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ours = Qwen3VLVisionModel(vision_config_from_hf(data["vision_config"]), torch.bfloat16, device)
    ours.load_weights(CheckpointReader(tmp_path))
    ours.set_attention_backend(backend)
    pixels = torch.randn(int(grid.prod(-1).sum()), ours.config.patch_dim, device=device)
    with torch.inference_mode():
        embeds, deepstack = ours(pixels, grid)
        out = torch.cat([embeds[None], deepstack])
        hf_out = torch.stack(_flat(hf_forward(hf, pixels, grid.to(device))))
        exact = torch.stack(_flat(hf_forward(hf.float(), pixels, grid.to(device))))  # same weights
    assert out.shape[0] == 1 + len(data["vision_config"]["deepstack_visual_indexes"])
    return {
        "vs_hf": [norm_rel_err(a, b) for a, b in zip(out, hf_out)],
        "ours_vs_fp32": [norm_rel_err(a, b) for a, b in zip(out, exact)],
        "hf_vs_fp32": [norm_rel_err(a, b) for a, b in zip(hf_out, exact)],
    }


def _flat(outputs: tuple[torch.Tensor, list[torch.Tensor]]) -> list[torch.Tensor]:
    return [outputs[0], *outputs[1]]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("grid", [[[1, 32, 48], [1, 64, 36], [2, 16, 16]], [[1, 64, 64], [1, 64, 64]]],
                         ids=["mixed frames", "equal frames"])
def test_bf16_parity_qwen3_vl_2b_tower_on_cuda(tmp_path, backend, grid):
    """Real Qwen3-VL-2B vision config, random weights, bf16 on CUDA, on each attention backend.

    Ours vs transformers' bf16 tower within 2e-2, and no further from the fp32
    result than transformers' own bf16 tower is (up to 25% + 1e-3).
    """
    grid = torch.tensor(grid)
    errors = compare_real_config_tower(tmp_path, "cuda", grid, backend)
    print("bf16 relative errors [embeds, deepstack...]:", errors)
    assert max(errors["vs_hf"]) <= 2e-2, errors
    for ours, hf in zip(errors["ours_vs_fp32"], errors["hf_vs_fp32"]):
        assert ours <= 1.25 * hf + 1e-3, errors
