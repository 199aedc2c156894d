"""varlen_attention's Hopper kernel (ops/csrc/cuda/varlen_attention_sm90.cu, wgmma) vs the reference
and vs the mma.sync kernel, and the switch that picks between them.

Every GPU case checks, with the CUDA profiler, which kernel ran: a case meant for the wgmma kernel
fails if the call fell back to the old one (so a wrong dispatch cannot pass on the old kernel's
numbers), and causal / paged / fp32 / other head sizes must keep the old kernels. On a GPU other
than compute capability 9.0 the wgmma cases skip; on one they fail when the build lacks sm_90a.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ops
from ops import reference
from tests.ops.common import GPU, assert_close
from tests.ops.test_attention import cu, paged_kv

WGMMA, MMA = "varlen_wgmma_kernel", "varlen_mma_kernel"
HALF_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# The tower's shapes: one 1024px image (4096 patches), odd tails around the 64-row warpgroup and
# 128-key tile sizes, several images of different sizes, an empty segment.
SEGMENTS = {"1x4096": [4096], "1": [1], "63-64-65": [63, 64, 65], "1000-17-4096": [1000, 17, 4096],
            "5-0-9": [5, 0, 9]}


@pytest.fixture
def hopper(kernels):
    """The wgmma kernel must be available on a compute capability 9.0 GPU; other GPUs skip."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel runs on compute capability 9.0 only")
    assert kernels.attention_sm90_available(), "compute capability 9.0 but no sm_90a kernel body in the build"
    return kernels


def attention_kernels(fn) -> tuple[torch.Tensor, set[str]]:
    """fn()'s result and the names of the varlen attention kernels it launched."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "varlen" in e.name}
    return out, {k for k in (WGMMA, MMA, "varlen_simple_kernel") if any(k in n for n in names)}


def fused_qkv(lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype):
    """q, k, v as views of one fused qkv [T, (hq + 2 hkv) d] (row stride (hq + 2 hkv) d, head stride d)."""
    qkv = torch.randn(sum(lens), (hq + 2 * hkv) * d, dtype=dtype, device="cuda")
    q = qkv[:, : hq * d].view(-1, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(-1, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(-1, hkv, d)
    return q, k, v


def both_kernels(ops_, q, k, v, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The wgmma kernel's and the mma.sync kernel's result for one call, each checked to have run."""
    with ops_.attention_sm90(True):
        new, ran = attention_kernels(lambda: ops_.varlen_attention(q, k, v, *args))
    assert ran == {WGMMA}, ran
    with ops_.attention_sm90(False):
        old, ran = attention_kernels(lambda: ops_.varlen_attention(q, k, v, *args))
    assert ran == {MMA}, ran
    return new, old


@GPU
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_size", [64, 72, 80])
@pytest.mark.parametrize("heads", [(16, 16), (16, 4)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("lens", list(SEGMENTS.values()), ids=list(SEGMENTS))
def test_wgmma_matches_reference_and_old_kernel(hopper, dtype, head_size, heads, lens):
    q, k, v = fused_qkv(lens, *heads, head_size, dtype)
    args = (cu(lens, "cuda"), cu(lens, "cuda"), max(lens), max(lens), head_size**-0.5, False)
    new, old = both_kernels(hopper, q, k, v, args)
    expected = reference.varlen_attention(q, k, v, *args)
    assert_close(new, expected, dtype, 5)
    assert_close(old, expected, dtype, 5)
    assert_close(new, old, dtype, 5)


@GPU
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_wgmma_contiguous_inputs_large_scores_and_other_key_lengths(hopper, dtype):
    """Contiguous q/k/v, keys longer and shorter than queries (cu_seqlens_k differs), and scores
    large enough that the running maximum moves across tiles (the output rescale)."""
    lq, lk, hq, d = [300, 129, 7], [520, 3, 0], 8, 72
    q = torch.randn(sum(lq), hq, d, dtype=dtype, device="cuda")
    k = torch.randn(sum(lk), hq, d, dtype=dtype, device="cuda")
    v = torch.randn(sum(lk), hq, d, dtype=dtype, device="cuda")
    k[torch.arange(0, sum(lk), 37)] *= 4  # a few dominant keys, in several tiles
    args = (cu(lq, "cuda"), cu(lk, "cuda"), max(lq), max(lk), 0.5, False)
    new, old = both_kernels(hopper, q, k, v, args)
    expected = reference.varlen_attention(q, k, v, *args)
    assert_close(new, expected, dtype, 5)
    assert_close(new, old, dtype, 5)
    assert not new[sum(lq[:2]) :].any(), "queries of a segment without keys must be zeros"


@GPU
def test_calls_the_wgmma_kernel_does_not_take_keep_the_old_kernels(hopper):
    """With the switch on: causal, paged, fp32, head sizes other than 64/72/80 and views that are not
    16-byte aligned run the old kernels, with their results."""
    lens, hq, hkv = [70, 130], 8, 2
    meta = (cu(lens, "cuda"), cu(lens, "cuda"), max(lens), max(lens))
    q, k, v = fused_qkv(lens, hq, hkv, 64, torch.bfloat16)
    kc, vc, table, kp, vp = paged_kv(lens, hkv, 64, torch.bfloat16, "cuda")
    q128, k128, v128 = fused_qkv(lens, hq, hkv, 128, torch.bfloat16)
    q32, k32, v32 = (x.float() for x in (q, k, v))
    rows = torch.randn(sum(lens), 1 + hq * 64, dtype=torch.bfloat16, device="cuda")
    q_unaligned = rows[:, 1:].view(-1, hq, 64)
    calls = {
        "causal": ((q, k, v, *meta, 0.125, True), {}, MMA),
        "paged": ((q, None, None, *meta, 0.125, False), dict(key_cache=kc, value_cache=vc, block_tables=table), MMA),
        "fp32": ((q32, k32, v32, *meta, 0.125, False), {}, "varlen_simple_kernel"),
        "d128": ((q128, k128, v128, *meta, 128**-0.5, False), {}, MMA),
        "unaligned": ((q_unaligned, k, v, *meta, 0.125, False), {}, "varlen_simple_kernel"),
    }
    with hopper.attention_sm90(True):
        for name, (args, kwargs, kernel) in calls.items():
            out, ran = attention_kernels(lambda: hopper.varlen_attention(*args, **kwargs))
            assert ran == {kernel}, (name, ran)
            dtype = args[0].dtype
            assert_close(out, reference.varlen_attention(*args, **kwargs), dtype, 5)
