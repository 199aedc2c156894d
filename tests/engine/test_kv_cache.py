"""The KV cache layout's byte counts (which size the cache) agree with the tensors it allocates."""

from __future__ import annotations

import pytest
import torch

from engine.errors import KVCacheTooSmallError
from engine.kv_cache import CacheLayout


def _layout(full: tuple[bool, ...], conv=(), recurrent=()) -> CacheLayout:
    return CacheLayout(full_attention=full, block_size=16, num_kv_heads=2, head_dim=8, max_num_seqs=3,
                       conv_state=conv, recurrent_state=recurrent, dtype=torch.bfloat16)


@pytest.mark.parametrize("full, conv, recurrent", [
    ((True, True), (), ()),
    ((False, True, False, False), (12, 3), (2, 4, 4)),
])
def test_allocated_bytes_match_the_layout(full, conv, recurrent):
    layout = _layout(full, conv, recurrent)
    caches = layout.allocate(5, torch.device("cpu"))
    assert len(caches) == len(full)
    total = sum(t.numel() * t.element_size() for pair in caches for t in pair)
    assert total == 5 * layout.block_bytes + layout.state_bytes
    for is_full, (a, b) in zip(full, caches):
        if is_full:
            assert a.shape == b.shape == (5, 16, 2, 8) and a.dtype == torch.bfloat16
        else:
            assert a.shape == (3, *conv) and b.shape == (3, *recurrent) and b.dtype == torch.float32
        assert not a.any() and not b.any()


def test_num_blocks_fits_the_budget_after_the_state_pools():
    layout = _layout((False, True), (12, 3), (2, 4, 4))
    budget = layout.state_bytes + 7 * layout.block_bytes + layout.block_bytes - 1
    assert layout.num_blocks(budget) == 7
    assert layout.num_blocks(budget, cap=4) == 4
    with pytest.raises(KVCacheTooSmallError, match="linear-attention state"):
        layout.num_blocks(layout.state_bytes + layout.block_bytes - 1)
