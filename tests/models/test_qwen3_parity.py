"""Qwen3 / Qwen3-MoE decoder logits vs transformers' own models on tiny checkpoints (fp32).

Image inputs: transformers runs its full model on pixel values; ours gets the
image and deepstack embeddings from transformers' vision tower and the mRoPE
positions from its `get_rope_index`, so this checks the decoder alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig, load_model_config
from models.interface import MultimodalBatch
from models.layers.attention import AttentionMetadata
from models.loader import CheckpointReader
from models.qwen3 import Qwen3ForCausalLM

ARCHS = ["qwen3_vl", "qwen3_vl_moe"]
TOL = 1e-4
BLOCK = 4


@dataclass
class Pair:
    config: ModelConfig
    hf: torch.nn.Module
    ours: Qwen3ForCausalLM


def load_fp32_models(model_dir: Path, model_cls: type) -> tuple[ModelConfig, torch.nn.Module, torch.nn.Module]:
    """The checkpoint's config, transformers' model of it and ours (`model_cls`), fp32 on CPU."""
    import transformers

    config = load_model_config(model_dir)
    hf = getattr(transformers, config.architecture).from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = model_cls(config, dtype=torch.float32, device="cpu")
    ours.load_weights(CheckpointReader(model_dir))
    return config, hf, ours


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tiny_checkpoint) -> Pair:
    return Pair(*load_fp32_models(tiny_checkpoint(request.param), Qwen3ForCausalLM))


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    rel = ((ours - ref).norm() / ref.norm()).item()
    max_abs = (ours - ref).abs().max().item()
    assert rel <= TOL, f"relative error {rel:.2e} > {TOL}"
    assert max_abs <= 50 * TOL * ref.abs().max().item(), f"max abs error {max_abs:.2e}"


def _prompt(config: ModelConfig, grids: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    """Text, then per image: vision_start, its image pads, vision_end, text."""
    gen = torch.Generator().manual_seed(seed)
    merge = config.vision.spatial_merge_size**2
    parts = [torch.randint(0, 1000, (5,), generator=gen)]
    for t, h, w in grids:
        pads = torch.full((t * h * w // merge,), config.image_token_id)
        parts += [torch.tensor([config.vision_start_token_id]), pads, torch.tensor([config.vision_end_token_id])]
        parts.append(torch.randint(0, 1000, (4,), generator=gen))
    return torch.cat(parts)


def _hf_reference(pair: Pair, ids: torch.Tensor, grids: list[tuple[int, int, int]]):
    """(HF logits [T, V], positions [3, T], MultimodalBatch | None)."""
    hf, config = pair.hf, pair.config
    if not grids:
        with torch.no_grad():
            logits = hf(input_ids=ids[None]).logits[0]
        return logits, torch.arange(len(ids)).expand(3, -1), None
    grid_thw = torch.tensor(grids)
    patch_dim = config.vision.patch_dim
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), patch_dim, generator=torch.Generator().manual_seed(1))
    extra = {}
    if "mm_token_type_ids" in inspect.signature(hf.model.get_rope_index).parameters:
        extra["mm_token_type_ids"] = (ids == config.image_token_id).int()[None]
    with torch.no_grad():
        logits = hf(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid_thw, **extra).logits[0]
        positions, _ = hf.model.get_rope_index(ids[None], image_grid_thw=grid_thw, **extra)
        features = hf.model.get_image_features(pixels, grid_thw, return_dict=True)
    embeds = torch.cat(features.pooler_output)
    deepstack = torch.stack([torch.cat(level) for level in features.deepstack_features])
    mm = MultimodalBatch(embeds, deepstack, ids == config.image_token_id)
    return logits, positions[:, 0], mm


@torch.no_grad()
def _full(ours: Qwen3ForCausalLM, ids: torch.Tensor, positions: torch.Tensor, mm: MultimodalBatch | None):
    hidden = ours(ids, positions, AttentionMetadata.packed([len(ids)], device=ids.device), None, mm)
    return ours.compute_logits(hidden)


def test_text_only_logits(pair: Pair) -> None:
    ids = torch.randint(0, pair.config.text.vocab_size, (23,), generator=torch.Generator().manual_seed(3))
    ref, positions, _ = _hf_reference(pair, ids, [])
    assert_logits_close(_full(pair.ours, ids, positions, None), ref)
    # Text-only positions may also come as [T].
    assert_logits_close(_full(pair.ours, ids, positions[0], None), ref)


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 8, 4), (1, 6, 6)]], ids=["one_image", "two_images"])
def test_image_text_logits(pair: Pair, grids) -> None:
    ids = _prompt(pair.config, grids)
    ref, positions, mm = _hf_reference(pair, ids, grids)
    assert mm.deepstack.shape[0] == len(pair.config.vision.deepstack_visual_indexes) > 0
    assert_logits_close(_full(pair.ours, ids, positions, mm), ref)


def _kv_caches(ours: Qwen3ForCausalLM, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    text = ours.config.text
    shape = (num_blocks, BLOCK, ours.num_kv_heads, text.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(text.num_hidden_layers)]


def step_metadata(
    chunks: list[tuple[int, int]], tables: torch.Tensor, slots: list[int] | None = None
) -> AttentionMetadata:
    """chunks[b] = (tokens already cached, new tokens) for sequence b, its KV in blocks
    tables[b] of BLOCK tokens; slots[b]: its state slot (hybrid models), None without."""
    mapping, new, total = [], [], []
    for b, (cached, n) in enumerate(chunks):
        mapping += [int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK for p in range(cached, cached + n)]
        new.append(n)
        total.append(cached + n)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    continues = [cached > 0 for cached, _ in chunks]
    state = {} if slots is None else {
        "state_indices": torch.tensor(slots, dtype=torch.int32),
        # As the engine passes it: None when every sequence continues its slot (decode kernels).
        "has_initial_state": None if all(continues) else torch.tensor(continues),
    }
    return AttentionMetadata(
        cu(new), cu(total), max(new), max(total), torch.tensor(mapping, dtype=torch.int64), tables,
        torch.tensor(total, dtype=torch.int32), decode_only=all(n == 1 for n in new), **state,
    )


def _slice_mm(mm: MultimodalBatch | None, start: int, end: int) -> MultimodalBatch | None:
    """The part of a sequence's vision inputs that falls in tokens [start, end)."""
    if mm is None or not mm.mask[start:end].any():
        return None
    before = int(mm.mask[:start].sum())
    rows = slice(before, before + int(mm.mask[start:end].sum()))
    return MultimodalBatch(mm.embeds[rows], mm.deepstack[:, rows], mm.mask[start:end])


@torch.no_grad()
def test_paged_chunked_prefill_and_decode_equal_full_sequence(pair: Pair) -> None:
    """Seq A (with an image) prefilled in two chunks, seq B (text) alongside; then batched decode."""
    ours = pair.ours
    ids_a = _prompt(pair.config, [(1, 4, 6)])
    ref_a, pos_a, mm_a = _hf_reference(pair, ids_a, [(1, 4, 6)])
    ids_b = torch.randint(0, 1000, (11,), generator=torch.Generator().manual_seed(5))
    ref_b, pos_b, _ = _hf_reference(pair, ids_b, [])
    decode = 3
    len_a, len_b = len(ids_a) - decode, len(ids_b) - decode
    split = 8  # inside the image of A
    caches = _kv_caches(ours, 32)
    blocks = -(-len(ids_a) // BLOCK)
    tables = torch.tensor([list(range(31, 31 - blocks, -1)), list(range(1, 1 + blocks))], dtype=torch.int32)

    logits_a = [ours.compute_logits(ours(ids_a[:split], pos_a[:, :split], step_metadata([(0, split)], tables[:1]),
                                         caches, _slice_mm(mm_a, 0, split)))]
    # Step 2: the rest of A's prompt and all of B's prompt in one batch.
    ids = torch.cat([ids_a[split:len_a], ids_b[:len_b]])
    positions = torch.cat([pos_a[:, split:len_a], pos_b[:, :len_b]], dim=1)
    part = _slice_mm(mm_a, split, len_a)
    mask = torch.cat([part.mask, torch.zeros(len_b, dtype=torch.bool)])
    mm = MultimodalBatch(part.embeds, part.deepstack, mask)
    meta = step_metadata([(split, len_a - split), (0, len_b)], tables)
    out = ours.compute_logits(ours(ids, positions, meta, caches, mm))
    logits_a.append(out[: len_a - split])
    logits_b = [out[len_a - split :]]
    for step in range(decode):
        pa, pb = len_a + step, len_b + step
        meta = step_metadata([(pa, 1), (pb, 1)], tables)
        assert meta.decode_only
        ids = torch.stack([ids_a[pa], ids_b[pb]])
        positions = torch.stack([pos_a[:, pa], pos_b[:, pb]], dim=1)
        out = ours.compute_logits(ours(ids, positions, meta, caches, None))
        logits_a.append(out[:1])
        logits_b.append(out[1:])
    assert_logits_close(torch.cat(logits_a), ref_a)
    assert_logits_close(torch.cat(logits_b), ref_b)
    torch.testing.assert_close(torch.cat(logits_a), _full(ours, ids_a, pos_a, mm_a), atol=1e-4, rtol=1e-4)


def test_bad_multimodal_batch_is_a_clear_error(pair: Pair) -> None:
    ids = _prompt(pair.config, [(1, 4, 4)])
    mask = ids == pair.config.image_token_id
    h = pair.config.text.hidden_size
    with pytest.raises(ValueError, match="one row per masked token"):
        _full(pair.ours, ids, torch.arange(len(ids)), MultimodalBatch(torch.zeros(1, h), None, mask))


def _save_text_only(tmp_path, arch: str) -> tuple:
    """A tiny text-only HF checkpoint (layout `model.*`, plain RoPE) through transformers."""
    import transformers

    common = dict(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if arch == "Qwen3MoeForCausalLM":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=12, norm_topk_prob=False,
                                          decoder_sparse_step=1, mlp_only_layers=[1])
    else:
        cfg = transformers.Qwen3Config(**common)
    cfg.architectures = [arch]
    model = getattr(transformers, arch)(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_text_only_architectures(tmp_path, arch: str) -> None:
    hf = _save_text_only(tmp_path, arch)
    config = load_model_config(tmp_path)
    ours = Qwen3ForCausalLM(config)
    keys = ours.load_weights(CheckpointReader(tmp_path))
    assert all(k.startswith(("model.", "lm_head.")) for k in keys)
    ids = torch.randint(0, 300, (17,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
    assert_logits_close(_full(ours, ids, torch.arange(17), None), ref)
    assert_logits_close(_full(ours, ids, torch.arange(17).expand(3, -1), None), ref)


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_bf16_parity_2b_random_weights(tmp_path) -> None:
    """Qwen3-VL-2B shapes, random weights, bf16 on the GPU, against transformers.

    Both bf16 runs are measured against transformers in fp32 (same weights, upcast): ours must be
    within 2e-2 of it or at least as close as transformers' own bf16 run, with argmax agreement
    no worse than transformers' bf16. (Ours against transformers' bf16 directly is printed too: two
    independent bf16 runs differ by about the sum of their rounding errors.)
    """
    import transformers

    from models.random_weights import write_random_checkpoint

    model_dir = write_random_checkpoint("configs/models/qwen3-vl-2b.json", tmp_path, torch.bfloat16, "cuda")
    config = load_model_config(model_dir)
    ids = torch.randint(0, config.text.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).cuda()
    ref = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = getattr(transformers, config.architecture).from_pretrained(model_dir, dtype=dtype).to("cuda").eval()
        with torch.no_grad():
            ref[name] = hf(input_ids=ids[None]).logits[0].float()
        del hf
        torch.cuda.empty_cache()
    ours = Qwen3ForCausalLM(config, dtype=torch.bfloat16, device="cuda")
    ours.load_weights(CheckpointReader(model_dir))
    out = _full(ours, ids, torch.arange(len(ids), device="cuda"), None)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    def same(a, b):
        return (a.argmax(-1) == b.argmax(-1)).float().mean().item()

    print(f"qwen3-vl-2b bf16 vs transformers fp32: ours rel {rel(out, ref['fp32']):.2e} argmax "
          f"{same(out, ref['fp32']):.4f} | transformers bf16 rel {rel(ref['bf16'], ref['fp32']):.2e} argmax "
          f"{same(ref['bf16'], ref['fp32']):.4f} | ours vs transformers bf16 rel {rel(out, ref['bf16']):.2e} "
          f"argmax {same(out, ref['bf16']):.4f}")
    assert rel(out, ref["fp32"]) <= max(2e-2, 1.05 * rel(ref["bf16"], ref["fp32"]))
    assert same(out, ref["fp32"]) >= min(0.99, same(ref["bf16"], ref["fp32"]) - 0.01)
