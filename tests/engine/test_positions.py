"""mRoPE positions vs transformers' own `get_rope_index` (Qwen3-VL and Qwen3.5)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import EngineInputError
from engine.positions import expand_image_placeholders, image_spans, mrope_positions, text_positions

IMG, VS, VE = 900, 901, 902


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_5"])
def hf_model(request, tiny_checkpoint):
    import transformers

    path = tiny_checkpoint(request.param)
    config = transformers.AutoConfig.from_pretrained(path)
    cls = transformers.Qwen3VLModel if request.param == "qwen3_vl" else transformers.Qwen3_5Model
    with torch.device("meta"):
        model = cls(config)
    return model


def _prompt(parts: list) -> list[int]:
    ids: list[int] = []
    for p in parts:
        if isinstance(p, tuple):
            t, h, w = p
            ids += [VS] + [IMG] * (t * h * w // 4) + [VE]
        else:
            ids += list(range(10, 10 + p))
    return ids


CASES = {
    "text_only": ([7], []),
    "one_image": ([3, (1, 4, 6), 5], [(1, 4, 6)]),
    "two_images": ([2, (1, 4, 6), 3, (1, 8, 2), 4], [(1, 4, 6), (1, 8, 2)]),
    "image_first": ([(1, 6, 4), 5], [(1, 6, 4)]),
    "image_last": ([4, (1, 2, 2)], [(1, 2, 2)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf_get_rope_index(hf_model, case):
    parts, grids = CASES[case]
    ids = _prompt(parts)
    if case == "image_first":
        ids = ids[1:]  # no <|vision_start|> at all: images are found by their tokens
    if case == "image_last":
        ids = ids[:-1]
    input_ids = torch.tensor([ids])
    mm_types = (input_ids == IMG).int()
    grid_t = torch.tensor(grids, dtype=torch.int64) if grids else None
    kwargs = {"image_grid_thw": grid_t} if grids else {}
    if grids:
        ref, ref_delta = hf_model.get_rope_index(input_ids, mm_token_type_ids=mm_types, **kwargs)
        ref, ref_delta = ref[:, 0], int(ref_delta[0, 0])
    else:
        ref, ref_delta = torch.arange(len(ids)).expand(3, -1), 0
    pos, delta = mrope_positions(ids, grids, 2, IMG)
    assert torch.equal(pos, ref)
    assert delta == ref_delta
    # decode continues at len + delta on all rows, as HF's generate does
    nxt = text_positions(len(ids), len(ids) + 3, delta)
    assert torch.equal(nxt[0], torch.arange(len(ids), len(ids) + 3) + ref_delta)
    assert torch.equal(nxt[1], nxt[2])


def test_adjacent_images_split_by_token_count():
    # transformers would group adjacent image tokens into one run; we split by
    # each image's token count, so image 1 is placed as if it were alone.
    ids = [5, VS] + [IMG] * 2 + [IMG] * 2 + [VE, 6]
    pos, _ = mrope_positions(ids, [(1, 2, 4), (1, 4, 2)], 2, IMG)
    alone, _ = mrope_positions([5, VS] + [IMG] * 2 + [VE], [(1, 2, 4)], 2, IMG)
    assert torch.equal(pos[:, :4], alone[:, :4])
    assert pos[0, 4:6].tolist() == [4, 4]  # image 2 starts after image 1's max(h, w) // 2 = 2


def test_image_spans_one_per_image():
    ids = [5, VS] + [IMG] * 2 + [IMG] * 3 + [VE, 6, VS] + [IMG] + [VE]
    assert image_spans(ids, IMG, [2, 3, 1]) == [(2, 4), (4, 7), (10, 11)]
    assert image_spans([1, 2], None, []) == []
    for counts in ([2, 2, 1], [2, 3], [2, 3, 1, 1]):
        with pytest.raises(EngineInputError):
            image_spans(ids, IMG, counts)


def test_expand_placeholders():
    ids = [1, VS, IMG, VE, 2, VS, IMG, VE]
    out = expand_image_placeholders(ids, IMG, [3, 2])
    assert out == [1, VS, IMG, IMG, IMG, VE, 2, VS, IMG, IMG, VE]
    with pytest.raises(EngineInputError):
        expand_image_placeholders(ids, IMG, [3])
    with pytest.raises(EngineInputError):
        expand_image_placeholders([1, 2], IMG, [3])


def test_grid_token_mismatch_is_typed_error():
    ids = [1, VS] + [IMG] * 5 + [VE]
    with pytest.raises(EngineInputError):
        mrope_positions(ids, [(1, 4, 4)], 2, IMG)
    with pytest.raises(EngineInputError):
        mrope_positions([1, 2, 3], [(1, 2, 2)], 2, IMG)
