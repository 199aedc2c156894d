"""MultimodalInputs crosses Ray (engine -> TP workers) as NumPy buffers, exactly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from engine.sequence import MultimodalInputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("deepstack", [True, False])
def test_multimodal_inputs_pickle_as_numpy_and_round_trip(dtype, deepstack):
    mm = MultimodalInputs(torch.randn(10, 8).to(dtype), torch.randn(3, 10, 8).to(dtype) if deepstack else None,
                          [(1, 2, 4), (1, 2, 1)], ("a", "b"))
    _, args = mm.__reduce__()
    assert isinstance(args[0], np.ndarray) and (isinstance(args[2], np.ndarray) or not deepstack)
    back = pickle.loads(pickle.dumps(mm, protocol=5))
    assert back.image_embeds.dtype == dtype and torch.equal(back.image_embeds, mm.image_embeds)
    if deepstack:
        assert torch.equal(back.deepstack_embeds, mm.deepstack_embeds)
    else:
        assert back.deepstack_embeds is None
    assert back.image_grid_thw == ((1, 2, 4), (1, 2, 1)) and back.image_hashes == ("a", "b")
