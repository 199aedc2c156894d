"""paged_attention_decode's partition merge: fused into the decode kernel (the last CTA of a
(sequence, head group) merges, one launch) == the merge kernel (two launches) == the reference.

The partitions follow the block-table width and the SM count (ops/csrc/cuda/paged_attention.cu):
at batch 1 a 1,024-token table is cut into tens of partitions and a 4,096-token one into over a
hundred (two merge levels: chunks, then the chunks). The cases use 1, some and all of them,
sequences shorter than others in the batch (their partitions past seq_len draw no ticket), an
empty one, head groups 1/2/4/8 on the CUDA-core and tensor-core kernels, calls in a row (the
ticket counters must be back at zero after each) and CUDA-graph replays.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ops
from ops import reference
from tests.ops.common import CUDA_DTYPES, GPU, assert_close

BLOCK = 16
MERGE_KERNEL = "paged_decode_merge_kernel"

# (q heads, kv heads, head_dim): groups 1, 2, 4 and 8. bf16/fp16 take the tensor-core kernel at
# groups >= 4 and D 128/256; fp32, D 64/72 and smaller groups the CUDA-core one. D 72 with 8
# heads a CTA has more (head, float4 column) items than threads, one head across two turns.
SHAPES = [(4, 4, 64), (8, 4, 128), (16, 4, 128), (32, 4, 128), (8, 2, 256), (16, 2, 72)]
# (seq_lens, table width in blocks of 16).
CASES = {
    "b1-one-partition": ([17], 64),
    "b1-some": ([531], 64),
    "b1-all": ([1024], 64),
    "b1-4096-all": ([4096], 256),
    "b1-4096-partial-last": ([4096 - 15], 256),
    "b1-4096-some-chunks": ([900], 256),
    "b1-4096-two-partitions": ([33], 256),
    "b2-long-short": ([4000, 40], 256),
    "b5-unused-and-empty": ([1024, 1, 300, 0, 1000], 64),
    "b33": (torch.randint(1, 2049, (33,), generator=torch.Generator().manual_seed(5)).tolist(), 128),
}


def decode_case(lens: list[int], width: int, shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0):
    """Caches (random everywhere), a table of `width` distinct random blocks per sequence, q, seq_lens."""
    hq, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    num_blocks = len(lens) * width + 3
    table = torch.randperm(num_blocks, generator=g)[: len(lens) * width].view(len(lens), width)
    kc = torch.randn(num_blocks, BLOCK, hkv, d, generator=g).to("cuda", dtype)
    vc = torch.randn(num_blocks, BLOCK, hkv, d, generator=g).to("cuda", dtype)
    q = torch.randn(len(lens), hq, d, generator=g).to("cuda", dtype)
    return q, kc, vc, table.to("cuda", torch.int32), torch.tensor(lens, dtype=torch.int32, device="cuda")


def decode(args: tuple, fused: bool) -> torch.Tensor:
    with ops.decode_fused_merge(fused):
        return ops.paged_attention_decode(*args)


def merge_launches(fn) -> tuple[torch.Tensor, int]:
    """fn()'s result and how many merge kernels it launched."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, sum(MERGE_KERNEL in e.name for e in prof.events())


@GPU
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}")
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_fused_merge_equals_merge_kernel_and_reference(kernels, dtype, shape, case):
    lens, width = case
    args = (*decode_case(lens, width, shape, dtype), shape[2] ** -0.5)
    expected = reference.paged_attention_decode(*args)
    fused = decode(args, True)
    two = decode(args, False)
    assert_close(fused, expected, dtype, 5)
    assert_close(two, expected, dtype, 5)
    assert_close(fused, two, dtype)  # the same partitions, merged in another order
    empty = (torch.tensor(lens) == 0).cuda()
    assert not fused[empty].any(), "an empty sequence's output must be zeros"


@GPU
@pytest.mark.parametrize("shape", [(32, 4, 128), (4, 4, 64)], ids=["mma", "cuda-cores"])
def test_fused_merge_is_one_launch(kernels, shape):
    """Many partitions at batch 1: fused, no merge kernel runs; off, one."""
    args = (*decode_case([3000], 256, shape, torch.bfloat16), 0.1)
    fused, launches = merge_launches(lambda: decode(args, True))
    assert launches == 0
    two, launches = merge_launches(lambda: decode(args, False))
    assert launches == 1
    assert_close(fused, two, torch.bfloat16)


@GPU
@pytest.mark.parametrize("shape", [(32, 4, 128), (16, 2, 72)], ids=["mma", "cuda-cores"])
def test_calls_in_a_row_reset_the_counters(kernels, shape):
    """Each call leaves its ticket counters at zero: the next calls of the same grid (other
    lengths, so other CTAs merge and other counters are drawn) are right, with the merge kernel
    in between too, and the results do not depend on which CTA merged."""
    dtype = torch.bfloat16
    q, kc, vc, table, _ = decode_case([1] * 3, 256, shape, dtype)
    runs = ([4096, 100, 2500], [33, 4096, 1], [700, 701, 4095])
    firsts = []
    for lens in runs:
        q = torch.randn_like(q)
        args = (q, kc, vc, table, torch.tensor(lens, dtype=torch.int32, device="cuda"), 0.08)
        first, second, two, third = (decode(args, fused) for fused in (True, True, False, True))
        assert torch.equal(first, second) and torch.equal(first, third), "fused calls in a row differ"
        assert_close(first, reference.paged_attention_decode(*args), dtype, 5)
        assert_close(two, first, dtype)
        firsts.append((args, first))
    for args, first in firsts:  # again, after the others drew the counters
        assert torch.equal(decode(args, True), first)


@GPU
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", [(32, 4, 128), (16, 2, 72)], ids=["hq32-hkv4-d128", "hq16-hkv2-d72"])
@pytest.mark.parametrize("batch,width", [(1, 256), (3, 64)])
def test_graph_replays_equal_eager(kernels, dtype, shape, batch, width):
    """Capture once (after an eager warm-up, as the engine does), replay with new queries and
    lengths: every replay equals the eager fused call bit for bit, and the reference."""
    q, kc, vc, table, seq_lens = decode_case([width * BLOCK] * batch, width, shape, dtype)
    scale = shape[2] ** -0.5
    with ops.decode_fused_merge(True):
        ops.paged_attention_decode(q, kc, vc, table, seq_lens, scale)  # warm-up: sizes the counters
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.paged_attention_decode(q, kc, vc, table, seq_lens, scale)
    g = torch.Generator().manual_seed(7)
    for replay in range(5):
        q.copy_(torch.randn(q.shape, generator=g).to(q))
        lens = torch.randint(1, width * BLOCK + 1, (batch,), generator=g)
        lens[replay % batch] = [1, width * BLOCK, 33, width * BLOCK - 5, 200][replay]
        seq_lens.copy_(lens)
        graph.replay()
        eager = decode((q, kc, vc, table, seq_lens, scale), True)
        assert torch.equal(out, eager), f"replay {replay}: graph != eager"
        assert_close(out, reference.paged_attention_decode(q, kc, vc, table, seq_lens, scale), dtype, 5)


@GPU
def test_graph_captured_before_any_eager_call_of_its_size(kernels):
    """A capture whose grid needs more ticket counters than any eager call so far allocated
    captures the merge kernel instead (no allocation while capturing); either way it is right.
    The blocks repeat across sequences to keep the caches small at a large batch."""
    hq, hkv, d, width, batch = 8, 8, 64, 512, 300
    g = torch.Generator().manual_seed(11)
    kc = torch.randn(64, BLOCK, hkv, d, generator=g).to("cuda", torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.randint(0, 64, (batch, width), generator=g, dtype=torch.int32).cuda()
    q = torch.randn(batch, hq, d, generator=g).to("cuda", torch.bfloat16)
    seq_lens = torch.randint(1, width * BLOCK + 1, (batch,), generator=g, dtype=torch.int32).cuda()
    with ops.decode_fused_merge(True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.paged_attention_decode(q, kc, vc, table, seq_lens, d**-0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference.paged_attention_decode(q, kc, vc, table, seq_lens, d**-0.5), torch.bfloat16, 5)
        assert_close(out, decode((q, kc, vc, table, seq_lens, d**-0.5), True), torch.bfloat16)
