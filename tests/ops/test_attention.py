"""varlen_attention / paged_attention_decode: kernels vs reference, reference vs SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops import reference
from tests.ops.common import DEVICE_DTYPES, DEVICES, assert_close, raises

BLOCK = 16


def cu(lengths: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def paged_kv(lengths, hkv, d, dtype, device, spare_blocks=3):
    """Write each sequence's K/V into randomly placed blocks; return caches, block table, packed K/V."""
    blocks_per_seq = [max(1, -(-n // BLOCK)) for n in lengths]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks).tolist()
    table = torch.zeros(len(lengths), max(blocks_per_seq) + 1, dtype=torch.int32)
    slots = []
    for b, (n, nb) in enumerate(zip(lengths, blocks_per_seq)):
        table[b, :nb] = torch.tensor(order[:nb], dtype=torch.int32)
        order = order[nb:]
        slots += [int(table[b, j // BLOCK]) * BLOCK + j % BLOCK for j in range(n)]
    k = torch.randn(sum(lengths), hkv, d, dtype=dtype, device=device)
    v = torch.randn(sum(lengths), hkv, d, dtype=dtype, device=device)
    kc = torch.randn(num_blocks, BLOCK, hkv, d, dtype=dtype, device=device)  # garbage elsewhere
    vc = torch.randn_like(kc)
    reference.reshape_and_cache(k, v, kc, vc, torch.tensor(slots, dtype=torch.long, device=device))
    return kc, vc, table.to(device), k, v


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_packed(kernels, device, dtype, heads, causal):
    hq, hkv = heads
    d = 64
    lens = [5, 1, 17, 0, 33]
    q = torch.randn(sum(lens), hq, d, dtype=dtype, device=device)
    k = torch.randn(sum(lens), hkv, d, dtype=dtype, device=device)
    v = torch.randn(sum(lens), hkv, d, dtype=dtype, device=device)
    args = (cu(lens, device), cu(lens, device), max(lens), max(lens), d**-0.5, causal)
    assert_close(kernels.varlen_attention(q, k, v, *args), reference.varlen_attention(q, k, v, *args), dtype, 5)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("head_size", [72, 80, 128, 256])
def test_varlen_head_sizes_and_fused_qkv_views(kernels, device, dtype, head_size):
    """q/k/v are strided views of one fused qkv tensor; keys longer than queries (bottom-right causal)."""
    hq, hkv, lq, lk = 4, 2, [3, 9], [7, 20]
    qkv_q = torch.randn(sum(lq), (hq + 2 * hkv) * head_size, dtype=dtype, device=device)
    q = qkv_q[:, : hq * head_size].view(sum(lq), hq, head_size)
    qkv_k = torch.randn(sum(lk), (hq + 2 * hkv) * head_size, dtype=dtype, device=device)
    k = qkv_k[:, hq * head_size : (hq + hkv) * head_size].view(sum(lk), hkv, head_size)
    v = qkv_k[:, (hq + hkv) * head_size :].view(sum(lk), hkv, head_size)
    args = (cu(lq, device), cu(lk, device), max(lq), max(lk), head_size**-0.5, True)
    assert_close(kernels.varlen_attention(q, k, v, *args), reference.varlen_attention(q, k, v, *args), dtype, 5)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("head_size", [64, 72, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
def test_varlen_long_sequences(kernels, device, dtype, head_size, causal, paged):
    """Several 128-row query tiles per sequence and enough of them for the CUDA kernel's 8-warp CTAs:
    partial tiles, keys longer and shorter than queries (rows that see no key are zeros), empty queries."""
    hq, hkv = 16, 4
    lq, lk = [300, 129, 0, 260, 77], [340, 169, 5, 260, 50]
    q = torch.randn(sum(lq), hq, head_size, dtype=dtype, device=device)
    args = (cu(lq, device), cu(lk, device), max(lq), max(lk), head_size**-0.5, causal)
    if paged:
        kc, vc, table, k, v = paged_kv(lk, hkv, head_size, dtype, device)
        out = kernels.varlen_attention(q, None, None, *args, kc, vc, table)
    else:
        k = torch.randn(sum(lk), hkv, head_size, dtype=dtype, device=device)
        v = torch.randn(sum(lk), hkv, head_size, dtype=dtype, device=device)
        out = kernels.varlen_attention(q, k, v, *args)
    assert_close(out, reference.varlen_attention(q, k, v, *args), dtype, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_zero_length_batch(kernels, device):
    q = torch.empty(0, 4, 64, device=device)
    out = kernels.varlen_attention(q, q[:, :2], q[:, :2], cu([], device), cu([], device), 0, 0, 0.125, True)
    assert out.shape == (0, 4, 64)
    kc = torch.zeros(2, BLOCK, 2, 64, device=device)
    out = kernels.varlen_attention(q, None, None, cu([0], device), cu([0], device), 0, 0, 0.125, True,
                                   kc, kc, torch.zeros(1, 1, dtype=torch.int32, device=device))
    assert out.shape == (0, 4, 64)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("head_size", [64, 128])
def test_varlen_paged_prefix_chunked_prefill(kernels, device, dtype, head_size):
    """Chunked prefill: new queries attend to a cached prefix plus themselves, read from paged blocks."""
    hq, hkv = 4, 2
    new, prefix = [5, 16, 1, 9], [0, 16, 30, 7]
    total = [n + p for n, p in zip(new, prefix)]
    kc, vc, table, k, v = paged_kv(total, hkv, head_size, dtype, device)
    q = torch.randn(sum(new), hq, head_size, dtype=dtype, device=device)
    args = (cu(new, device), cu(total, device), max(new), max(total), head_size**-0.5, True)
    out = kernels.varlen_attention(q, None, None, *args, kc, vc, table)
    assert_close(out, reference.varlen_attention(q, None, None, *args, kc, vc, table), dtype, 5)
    assert_close(out, reference.varlen_attention(q, k, v, *args), dtype, 5)  # same keys, packed


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("head_size", [64, 72, 128, 256])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
def test_paged_decode(kernels, device, dtype, head_size, heads):
    hq, hkv = heads
    lens = [1, 16, 17, 70]
    kc, vc, table, k, v = paged_kv(lens, hkv, head_size, dtype, device)
    q = torch.randn(len(lens), hq, head_size, dtype=dtype, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = kernels.paged_attention_decode(q, kc, vc, table, seq_lens, head_size**-0.5)
    assert_close(out, reference.paged_attention_decode(q, kc, vc, table, seq_lens, head_size**-0.5), dtype, 5)
    # Decode == causal varlen with one query per sequence over its packed keys.
    ones = [1] * len(lens)
    packed = reference.varlen_attention(q, k, v, cu(ones, device), cu(lens, device), 1, max(lens),
                                        head_size**-0.5, True)
    assert_close(out, packed, dtype, 5)


# (q heads, kv heads, head_dim) of configs/models/*.json: GQA group 8 at D 128 (30B-A3B), group 4 and 8
# at D 256 (0.8B, 35B-A3B); group 8 at D 64 runs the CUDA-core kernel (the tensor-core one takes D 128/256).
DECODE_SHAPES = [(32, 4, 128), (8, 2, 256), (16, 2, 256), (16, 2, 64)]
# Contexts: shorter than one partition (odd, one token, a partial 16-token block), a large batch of
# short contexts (several balanced partitions per sequence, mostly unused ones for the short
# sequences), and a long one beside a short one (many partitions, the merge over them).
DECODE_LENS = {
    "short": [1, 15, 33, 7],
    "batch64": torch.randint(1, 530, (64,), generator=torch.Generator().manual_seed(1)).tolist(),
    "long": [2049, 17],
}


def _decode_case(lens, shape, dtype, device, q_offset=0):
    """Caches, table, seq_lens and a query [B, Hq, D] that is a view of a wider (fused qkv) row
    starting q_offset elements in."""
    hq, hkv, d = shape
    kc, vc, table, k, v = paged_kv(lens, hkv, d, dtype, device)
    rows = torch.randn(len(lens), q_offset + (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q = rows[:, q_offset : q_offset + hq * d].view(len(lens), hq, d)
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}")
@pytest.mark.parametrize("lens", list(DECODE_LENS.values()), ids=list(DECODE_LENS))
def test_paged_decode_gqa_groups_and_partitions(kernels, device, dtype, shape, lens):
    q, kc, vc, table, seq_lens = _decode_case(lens, shape, dtype, device)
    scale = shape[2] ** -0.5
    out = kernels.paged_attention_decode(q, kc, vc, table, seq_lens, scale)
    assert_close(out, reference.paged_attention_decode(q, kc, vc, table, seq_lens, scale), dtype, 5)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("q_offset", [0, 1], ids=["aligned-view", "unaligned-view"])
def test_paged_decode_query_views(kernels, device, dtype, q_offset):
    """The tensor-core kernel loads q rows as 16-byte chunks; a query view that is not 16-byte
    aligned takes the CUDA-core kernel, with the same result."""
    q, kc, vc, table, seq_lens = _decode_case([40, 3, 600], (32, 4, 128), dtype, device, q_offset)
    out = kernels.paged_attention_decode(q, kc, vc, table, seq_lens, 0.1)
    assert_close(out, reference.paged_attention_decode(q, kc, vc, table, seq_lens, 0.1), dtype, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_zero_batch(kernels, device):
    kc = torch.zeros(2, BLOCK, 1, 64, device=device)
    out = kernels.paged_attention_decode(torch.empty(0, 2, 64, device=device), kc, kc,
                                         torch.zeros(0, 1, dtype=torch.int32, device=device),
                                         torch.zeros(0, dtype=torch.int32, device=device), 0.125)
    assert out.shape == (0, 2, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_rejects_bad_input(kernels, device):
    q = torch.randn(6, 4, 64, device=device)
    kv = torch.randn(6, 3, 64, device=device)
    with raises(device, "multiple"):
        kernels.varlen_attention(q, kv, kv, cu([6], device), cu([6], device), 6, 6, 0.1, True)
    kv = torch.randn(6, 2, 64, device=device)
    with raises(device, "cu_seqlens"):
        kernels.varlen_attention(q, kv, kv, cu([6], device), cu([3, 3], device), 6, 3, 0.1, True)
    kc = torch.zeros(2, BLOCK, 2, 64, device=device)
    with raises(device, "either"):
        kernels.varlen_attention(q, kv, kv, cu([6], device), cu([6], device), 6, 6, 0.1, True, kc, kc, None)
    if device == "cpu":  # table bounds are checked on the host only
        table = torch.zeros(1, 1, dtype=torch.int32)
        with raises(device, "blocks"):
            kernels.paged_attention_decode(q[:1], kc, kc, table, torch.tensor([40], dtype=torch.int32), 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_opcheck(kernels, device):
    lens = [3, 20]
    kc, vc, table, k, v = paged_kv(lens, 2, 64, torch.float32, device)
    q = torch.randn(sum(lens), 4, 64, device=device)
    out = torch.empty_like(q)
    args = (cu(lens, device), cu(lens, device), max(lens), max(lens), 0.125, True)
    torch.library.opcheck(torch.ops.splitvl.varlen_attention.default, (out, q, k, v, *args, None, None, None))
    torch.library.opcheck(torch.ops.splitvl.varlen_attention.default, (out, q, None, None, *args, kc, vc, table))
    qd = q[:2].clone()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.splitvl.paged_attention_decode.default,
                          (torch.empty_like(qd), qd, kc, vc, table, seq_lens, 0.125))


@pytest.mark.parametrize("causal", [True, False])
def test_reference_varlen_matches_sdpa_per_segment(causal):
    hq, hkv, d, lens = 4, 2, 32, [4, 11, 1]
    q = torch.randn(sum(lens), hq, d, )
    k = torch.randn(sum(lens), hkv, d, )
    v = torch.randn(sum(lens), hkv, d, )
    out = reference.varlen_attention(q, k, v, cu(lens, "cpu"), cu(lens, "cpu"), 11, 11, 0.3, causal)
    start = 0
    for n in lens:
        seg = slice(start, start + n)
        qs, ks, vs = (x[seg].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(hq // hkv, 0), vs.repeat_interleave(hq // hkv, 0)
        expected = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=0.3).transpose(0, 1)
        torch.testing.assert_close(out[seg], expected)
        start += n


def test_reference_causal_is_bottom_right_aligned():
    """Query i of Lq queries over Lk keys sees keys j <= i + Lk - Lq (SDPA with an explicit mask)."""
    lq, lk, d = 3, 8, 16
    q, k, v = torch.randn(lq, 1, d), torch.randn(lk, 1, d), torch.randn(lk, 1, d)
    out = reference.varlen_attention(q, k, v, cu([lq], "cpu"), cu([lk], "cpu"), lq, lk, 0.25, True)
    mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.25
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected)
