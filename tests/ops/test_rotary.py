"""rotary_embedding: plain, partial, mRoPE (interleaved, chunked), ViT 2-D; vs reference and transformers."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.common import raises, DEVICE_DTYPES, DEVICES, assert_close

MAX_POS = 512


def make_cache(rot_dim: int, base: float = 10000.0, max_pos: int = MAX_POS, device: str = "cpu") -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def run_both(kernels, positions, q, k, head_size, cache, **kw):
    """Apply kernel and reference on clones; assert equal; return the kernel results."""
    q_ref, k_ref = q.clone(), None if k is None else k.clone()
    reference.rotary_embedding(positions, q_ref, k_ref, head_size, cache, **kw)
    kernels.rotary_embedding(positions, q, k, head_size, cache, **kw)
    assert_close(q, q_ref, q.dtype)
    if k is not None:
        assert_close(k, k_ref, k.dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("tokens", [0, 1, 13])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("is_neox", [True, False])
def test_plain_rope(kernels, device, dtype, tokens, head_size, is_neox):
    positions = torch.randint(0, MAX_POS, (tokens,), device=device)
    q = torch.randn(tokens, 4 * head_size, dtype=dtype, device=device)
    k = torch.randn(tokens, 2, head_size, dtype=dtype, device=device)
    run_both(kernels, positions, q, k, head_size, make_cache(head_size, device=device), is_neox=is_neox)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_rope_on_slices_of_fused_qkv(kernels, device, dtype):
    tokens, hq, hkv, d = 9, 4, 2, 128
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    q = qkv[:, : hq * d]
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    positions = torch.randint(0, MAX_POS, (3, tokens), device=device)
    run_both(kernels, positions, q, k, d, make_cache(d, device=device),
             mrope_section=[24, 20, 20], mrope_interleaved=True)
    torch.testing.assert_close(qkv[:, (hq + hkv) * d :], v_before, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_mrope_qwen3_vl_sections(kernels, device, dtype, interleaved):
    tokens, d = 11, 128
    positions = torch.randint(0, MAX_POS, (3, tokens), device=device)
    q = torch.randn(tokens, 4, d, dtype=dtype, device=device)
    k = torch.randn(tokens, 1, d, dtype=dtype, device=device)
    run_both(kernels, positions, q, k, d, make_cache(d, device=device),
             mrope_section=[24, 20, 20], mrope_interleaved=interleaved)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_mrope_partial_rotary_qwen3_5(kernels, device, dtype):
    """head_dim 256 with partial_rotary_factor 0.25: only the first 64 dims rotate."""
    tokens, d, rot = 7, 256, 64
    positions = torch.randint(0, MAX_POS, (3, tokens), device=device)
    q = torch.randn(tokens, 2 * d, dtype=dtype, device=device)
    k = torch.randn(tokens, 1 * d, dtype=dtype, device=device)
    q_pass = q.view(tokens, 2, d)[..., rot:].clone()
    run_both(kernels, positions, q, k, d, make_cache(rot, device=device),
             mrope_section=[11, 11, 10], mrope_interleaved=True)
    torch.testing.assert_close(q.view(tokens, 2, d)[..., rot:], q_pass, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("head_size", [64, 72, 80])
def test_vit_two_section_rope(kernels, device, dtype, head_size):
    """ViT 2-D RoPE: rows (h, w), chunked sections [D/4, D/4], key None path too."""
    tokens = 10
    positions = torch.randint(0, 64, (2, tokens), device=device)
    q = torch.randn(tokens, 3, head_size, dtype=dtype, device=device)
    run_both(kernels, positions, q, None, head_size, make_cache(head_size, max_pos=64, device=device),
             mrope_section=[head_size // 4, head_size // 4])


@pytest.mark.parametrize("device", DEVICES)
def test_rope_rejects_bad_input(kernels, device):
    q = torch.randn(4, 2, 64, device=device)
    cache = make_cache(64, device=device)
    with raises(device, "mrope_section"):
        kernels.rotary_embedding(torch.zeros(3, 4, dtype=torch.long, device=device), q, None, 64, cache,
                                 mrope_section=[10, 10, 10])
    with raises(device, "tokens"):
        kernels.rotary_embedding(torch.zeros(5, dtype=torch.long, device=device), q, None, 64, cache)
    if device == "cpu":  # bounds are checked on the host only
        with raises(device, "outside"):
            kernels.rotary_embedding(torch.full((4,), MAX_POS, device=device), q, None, 64, cache)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_opcheck(kernels, device):
    tokens, d = 5, 64
    cache = make_cache(d, device=device)
    q = torch.randn(tokens, 2 * d, device=device)
    k = torch.randn(tokens, d, device=device)
    op = torch.ops.splitvl.rotary_embedding.default
    torch.library.opcheck(op, (torch.randint(0, MAX_POS, (tokens,), device=device), q, k, d, cache, True, [], False))
    torch.library.opcheck(
        op, (torch.randint(0, MAX_POS, (3, tokens), device=device), q, None, d, cache, True, [12, 10, 10], True)
    )


def _hf_rotary(rope_cls, config, apply_fn, q, k, positions):
    rope = rope_cls(config)
    cos, sin = rope(q, positions[:, None, :])  # [1, T, rot_dim] fp32
    q_hf, k_hf = apply_fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1), rope.inv_freq


def _cache_from_inv_freq(inv_freq: torch.Tensor) -> torch.Tensor:
    freqs = torch.arange(MAX_POS, dtype=torch.float)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def test_reference_matches_transformers_qwen3_vl_mrope():
    from transformers.models.qwen3_vl import modeling_qwen3_vl as m
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig

    config = Qwen3VLTextConfig(
        head_dim=128, hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    )
    tokens = 17
    positions = torch.randint(0, MAX_POS, (3, tokens))
    q, k = torch.randn(tokens, 2, 128), torch.randn(tokens, 1, 128)
    q_hf, k_hf, inv_freq = _hf_rotary(m.Qwen3VLTextRotaryEmbedding, config, m.apply_rotary_pos_emb, q, k, positions)
    reference.rotary_embedding(positions, q, k, 128, _cache_from_inv_freq(inv_freq),
                               mrope_section=[24, 20, 20], mrope_interleaved=True)
    torch.testing.assert_close(q, q_hf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k, k_hf, atol=1e-4, rtol=1e-4)


def test_reference_matches_transformers_qwen3_5_partial_mrope():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        head_dim=256, hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_section": [11, 11, 10],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    )
    tokens = 9
    positions = torch.randint(0, MAX_POS, (3, tokens))
    q, k = torch.randn(tokens, 2, 256), torch.randn(tokens, 1, 256)
    q_hf, k_hf, inv_freq = _hf_rotary(m.Qwen3_5TextRotaryEmbedding, config, m.apply_rotary_pos_emb, q, k, positions)
    assert inv_freq.numel() == 32
    reference.rotary_embedding(positions, q, k, 256, _cache_from_inv_freq(inv_freq),
                               mrope_section=[11, 11, 10], mrope_interleaved=True)
    torch.testing.assert_close(q, q_hf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k, k_hf, atol=1e-4, rtol=1e-4)


def test_reference_chunked_sections_match_naive_loop():
    """Chunked layout: frequency i takes its position from row s where section s holds i."""
    tokens, d, sections = 6, 32, [6, 5, 5]
    cache = make_cache(d)
    positions = torch.randint(0, MAX_POS, (3, tokens))
    x = torch.randn(tokens, 2, d)
    expected = x.clone()
    owner = [s for s, n in enumerate(sections) for _ in range(n)]
    for t in range(tokens):
        for i in range(d // 2):
            p = positions[owner[i], t]
            c, s = cache[p, i], cache[p, d // 2 + i]
            x1, x2 = x[t, :, i], x[t, :, i + d // 2]
            expected[t, :, i], expected[t, :, i + d // 2] = x1 * c - x2 * s, x2 * c + x1 * s
    reference.rotary_embedding(positions, x, None, d, cache, mrope_section=sections)
    torch.testing.assert_close(x, expected)
