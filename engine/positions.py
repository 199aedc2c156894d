"""mRoPE positions for text, image and video tokens, and placeholder expansion.

Same numbers as transformers' Qwen3-VL / Qwen3.5 `get_rope_index`: text tokens
advance all three rows together; the tokens of one image (grid t, h, w patches,
merged `spatial_merge_size` x `spatial_merge_size`) sit at
`(start + t_idx, start + h_idx, start + w_idx)`; the text after it continues at
`start + max(h, w) // merge` (images have t == 1). A video is one such span
per frame group (grid (1, h, w) each, `<|video_pad|>` tokens), because its
groups are separated by timestamp text: transformers splits `video_grid_thw`
the same way. During decode, the token at index `i` of the sequence has
position `i + mrope_delta` on all three rows.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from engine.errors import EngineInputError

TokenIds = int | Collection[int]


def _as_set(token_ids: TokenIds | None) -> frozenset[int]:
    if token_ids is None:
        return frozenset()
    return frozenset([token_ids]) if isinstance(token_ids, int) else frozenset(token_ids)


def expand_image_placeholders(
    token_ids: Sequence[int], image_token_id: TokenIds, tokens_per_image: Sequence[int]
) -> list[int]:
    """Repeat the i-th placeholder of `token_ids` `tokens_per_image[i]` times.

    `image_token_id` may be several ids (image and video pads); each keeps its id.

    Raises:
        EngineInputError: the number of placeholders differs from the number of images.
    """
    pads = _as_set(image_token_id)
    placeholders = sum(1 for t in token_ids if t in pads)
    if placeholders != len(tokens_per_image):
        raise EngineInputError(
            f"the prompt has {placeholders} image placeholder(s) but {len(tokens_per_image)} "
            "image(s) were given",
            param="images",
        )
    out: list[int] = []
    images = iter(tokens_per_image)
    for token in token_ids:
        if token in pads:
            count = next(images)
            if count < 1:
                raise EngineInputError("an image must have at least one token", param="images")
            out.extend([token] * count)
        else:
            out.append(token)
    return out


def _image_token_runs(token_ids: Sequence[int], image_token_id: TokenIds | None) -> list[tuple[int, int]]:
    """(start, end) index ranges of consecutive placeholder tokens (one id or several)."""
    placeholders = _as_set(image_token_id)
    runs: list[tuple[int, int]] = []
    start = None
    for i, token in enumerate(token_ids):
        if token in placeholders and start is None:
            start = i
        elif token not in placeholders and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(token_ids)))
    return runs


def image_spans(
    token_ids: Sequence[int], image_token_id: TokenIds | None, counts: Sequence[int]
) -> list[tuple[int, int]]:
    """(start, end) of each image's tokens, image i owning `counts[i]` of them.

    Adjacent images share one run of image tokens, so runs are split by the counts.
    Raises:
        EngineInputError: the image tokens do not add up to the counts.
    """
    spans: list[tuple[int, int]] = []
    k = 0
    for start, end in _image_token_runs(token_ids, image_token_id):
        pos = start
        while pos < end:
            if k >= len(counts) or pos + counts[k] > end:
                raise EngineInputError(
                    "image placeholder tokens do not match the image grids", param="images"
                )
            spans.append((pos, pos + counts[k]))
            pos += counts[k]
            k += 1
    if k != len(counts):
        raise EngineInputError(
            f"{len(counts)} image grid(s) given but the prompt holds tokens for {k}", param="images"
        )
    return spans


def mrope_positions(
    token_ids: Sequence[int],
    image_grid_thw: Sequence[Sequence[int]] | torch.Tensor | None,
    spatial_merge_size: int,
    image_token_id: TokenIds | None,
) -> tuple[torch.Tensor, int]:
    """3-D positions of a prompt whose placeholders are already expanded.

    `image_token_id` may be several ids (image and video pads): their runs are
    split into one span per grid, in prompt order.

    Images are found by their (expanded) `<|image_pad|>` tokens, as transformers does.

    Returns:
        positions [3, T] int64 and `mrope_delta` (decode position of index i is
        `i + mrope_delta`).
    Raises:
        EngineInputError: image tokens and grids disagree.
    """
    grids = [tuple(int(v) for v in g) for g in (image_grid_thw if image_grid_thw is not None else [])]
    n = len(token_ids)
    merge = spatial_merge_size
    counts = [t * (h // merge) * (w // merge) for t, h, w in grids]
    spans = image_spans(token_ids, image_token_id, counts)
    pieces: list[torch.Tensor] = []
    cursor, current = 0, 0
    for (start, end), (t, h, w) in zip(spans, grids, strict=True):
        if start > cursor:
            pieces.append(text_positions(0, start - cursor, current))
            current += start - cursor
        gh, gw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(
            torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"
        )
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
        current += max(gh, gw)
        cursor = end
    if n > cursor:
        pieces.append(text_positions(0, n - cursor, current))
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.int64), 0
    positions = torch.cat(pieces, dim=1).to(torch.int64).contiguous()
    delta = int(positions.max()) + 1 - n
    return positions, delta


def text_positions(start: int, end: int, mrope_delta: int = 0) -> torch.Tensor:
    """Positions [3, end - start] of text tokens at sequence indices [start, end):
    `i + mrope_delta` on all three rows (a text-only prompt, or tokens past the prompt)."""
    return (torch.arange(start, end, dtype=torch.int64) + mrope_delta).expand(3, -1)
