"""Layers vs transformers' modules and vs unsharded math (TP simulated rank by rank)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.layers.attention import Attention, AttentionMetadata, PromptPart
from models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from models.layers.layernorm import RMSNorm
from models.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    set_streamed_small_rows,
)
from models.layers.moe import SparseMoeBlock
from models.layers.parallel import ParallelContext
from models.layers.rotary import MRotaryEmbedding, RotaryEmbedding, vision_rotary_embedding

torch.manual_seed(0)


def _ranks(tp: int) -> list[ParallelContext]:
    return [ParallelContext(r, tp) for r in range(tp)]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_and_row_shards_recombine(tp: int) -> None:
    x, w, b = torch.randn(5, 12), torch.randn(8, 12), torch.randn(8)
    cols = [ColumnParallelLinear(12, 8, bias=True, parallel=p) for p in _ranks(tp)]
    for layer in cols:
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
    torch.testing.assert_close(torch.cat([layer(x) for layer in cols], -1), F.linear(x, w, b))

    rows = [RowParallelLinear(12, 8, bias=True, parallel=p, reduce_results=False) for p in _ranks(tp)]
    partial = []
    for layer in rows:
        spec = layer.weight.shard_spec()
        # The loader reads only the slice; the weight loader accepts it as is.
        sliced = w.narrow(spec.dim, spec.start, spec.length) if spec.dim is not None else w
        layer.weight.weight_loader(layer.weight, sliced)
        layer.bias.weight_loader(layer.bias, b)
        partial.append(F.linear(x[:, layer.tp_rank * (12 // tp) : (layer.tp_rank + 1) * (12 // tp)], layer.weight))
    torch.testing.assert_close(sum(partial) + b, F.linear(x, w, b))


@pytest.mark.parametrize("tp", [1, 2])
def test_merged_column_gate_up(tp: int) -> None:
    x, gate, up = torch.randn(3, 6), torch.randn(10, 6), torch.randn(10, 6)
    for fused in (False, True):
        outs = []
        for p in _ranks(tp):
            layer = MergedColumnParallelLinear(6, [10, 10], parallel=p)
            if fused:
                layer.weight.weight_loader(layer.weight, torch.cat([gate, up]))
            else:
                layer.weight.weight_loader(layer.weight, gate, 0)
                layer.weight.weight_loader(layer.weight, up, 1)
            outs.append(layer(x).chunk(2, -1))
        torch.testing.assert_close(torch.cat([o[0] for o in outs], -1), F.linear(x, gate))
        torch.testing.assert_close(torch.cat([o[1] for o in outs], -1), F.linear(x, up))


@pytest.mark.parametrize("tp", [1, 2])
def test_merged_column_loads_a_run_of_parts_from_one_tensor(tp: int) -> None:
    """A checkpoint tensor holding a run of parts (in_proj_qkv: parts 0-2 of in_proj) = the parts one by one."""
    parts = [torch.randn(n, 6) for n in (4, 8, 2)]
    for p in _ranks(tp):
        together, apart = (MergedColumnParallelLinear(6, [4, 8, 2], parallel=p) for _ in range(2))
        together.weight.weight_loader(together.weight, torch.cat(parts[:2]), (0, 1))
        assert together.weight.shard_spec((0, 1)).full_shape == (12, 6)
        for i, part in enumerate(parts):
            apart.weight.weight_loader(apart.weight, part, i)
        together.weight.weight_loader(together.weight, parts[2], 2)
        torch.testing.assert_close(together.weight, apart.weight, rtol=0, atol=0)
        with pytest.raises(ValueError, match="consecutive"):
            together.weight.shard_spec((0, 2))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_qkv_heads_split_and_kv_replicated(tp: int) -> None:
    heads, kv_heads, d, hidden = 8, 2, 4, 16
    x = torch.randn(3, hidden)
    wq, wk, wv = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden), torch.randn(kv_heads * d, hidden)
    bq, bk, bv = torch.randn(heads * d), torch.randn(kv_heads * d), torch.randn(kv_heads * d)
    q_ref = F.linear(x, wq, bq).unflatten(-1, (heads, d))
    k_ref = F.linear(x, wk, bk).unflatten(-1, (kv_heads, d))
    v_ref = F.linear(x, wv, bv).unflatten(-1, (kv_heads, d))
    for p in _ranks(tp):
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=True, parallel=p)
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            layer.weight.weight_loader(layer.weight, w, sid)
            layer.bias.weight_loader(layer.bias, b, sid)
        q, k, v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], -1)
        hq = heads // tp
        kv_head = p.tp_rank * kv_heads // tp if tp > kv_heads else p.tp_rank * layer.num_kv_heads
        torch.testing.assert_close(q.unflatten(-1, (-1, d)), q_ref[:, p.tp_rank * hq : (p.tp_rank + 1) * hq])
        torch.testing.assert_close(k.unflatten(-1, (-1, d)), k_ref[:, kv_head : kv_head + layer.num_kv_heads])
        torch.testing.assert_close(v.unflatten(-1, (-1, d)), v_ref[:, kv_head : kv_head + layer.num_kv_heads])
    fused = QKVParallelLinear(hidden, d, heads, kv_heads, bias=False)
    fused.weight.weight_loader(fused.weight, torch.cat([wq, wk, wv]))
    torch.testing.assert_close(fused.weight.data, torch.cat([wq, wk, wv]))


def test_weight_loader_rejects_wrong_shapes() -> None:
    layer = ColumnParallelLinear(12, 8, parallel=ParallelContext(0, 2))
    with pytest.raises(ValueError, match=r"\[8, 13\]"):
        layer.weight.weight_loader(layer.weight, torch.randn(8, 13))
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(12, 7, parallel=ParallelContext(0, 2))
    with pytest.raises(ValueError, match="no shard"):
        QKVParallelLinear(8, 4, 2, 2).weight.shard_spec("x")


def test_replicated_and_disable_tp_keep_full_weights() -> None:
    w = torch.randn(6, 4)
    for layer in (ReplicatedLinear(4, 6), ColumnParallelLinear(4, 6, parallel=ParallelContext(1, 2), disable_tp=True)):
        assert layer.weight.shard_spec().dim is None
        layer.weight.weight_loader(layer.weight, w)
        torch.testing.assert_close(layer.weight.data, w)


def test_set_streamed_small_rows_widens_and_restores() -> None:
    model = torch.nn.ModuleList([QKVParallelLinear(32, 8, 4, 2), RowParallelLinear(64, 32), ReplicatedLinear(32, 8)])
    built = [m.streams_small for m in model]
    assert built == [False, True, True]  # qkv's output (64) is wider than its input (32)
    set_streamed_small_rows(model, True)
    assert all(m.streams_small for m in model)
    set_streamed_small_rows(model, False)
    assert [m.streams_small for m in model] == built


def test_vocab_parallel_embedding_shards_with_padding() -> None:
    vocab, dim, tp = 11, 5, 2
    w, ids = torch.randn(vocab, dim), torch.tensor([0, 5, 6, 10, 3])
    parts, logits = torch.zeros(len(ids), dim), []
    for p in _ranks(tp):
        emb = VocabParallelEmbedding(vocab, dim, p)
        emb.weight.weight_loader(emb.weight, w)
        local = (ids >= emb.vocab_start) & (ids < emb.vocab_end)
        parts[local] += emb.weight[ids[local] - emb.vocab_start]
        head = ParallelLMHead(vocab, dim, p)
        head.weight.weight_loader(head.weight, w)
        logits.append(F.linear(parts.new_ones(2, dim), head.weight))
    torch.testing.assert_close(parts, F.embedding(ids, w))
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], F.linear(parts.new_ones(2, dim), w))
    single = ParallelLMHead(vocab, dim)
    single.weight.weight_loader(single.weight, w)
    assert single.compute_logits(torch.randn(3, dim)).dtype == torch.float32


def test_rms_norm_matches_transformers() -> None:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    ref = Qwen3VLTextRMSNorm(24, eps=1e-6)
    ref.weight.data.normal_()
    ours = RMSNorm(24, 1e-6)
    ours.weight.data.copy_(ref.weight.data)
    x, residual = torch.randn(7, 24), torch.randn(7, 24)
    torch.testing.assert_close(ours(x), ref(x))
    out, new_residual = ours(x.clone(), residual.clone())
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(out, ref(x + residual))


def _hf_text_rotary(head_dim: int, section: list[int], theta: float):
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = Qwen3VLTextConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section,
                         "mrope_interleaved": True},
    )
    return Qwen3VLTextRotaryEmbedding(cfg)


def test_interleaved_mrope_matches_transformers() -> None:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    d, section, theta, t = 32, [6, 5, 5], 5e6, 9
    positions = torch.randint(0, 50, (3, t))
    q, k = torch.randn(t, 4, d), torch.randn(t, 2, d)
    cos, sin = _hf_text_rotary(d, section, theta)(q, positions[:, None, :])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    rope = MRotaryEmbedding(d, d, 64, theta, section, interleaved=True)
    q_ours, k_ours = rope(positions, q.clone(), k.clone())
    torch.testing.assert_close(q_ours, q_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    # Text-only positions [T] equal mRoPE with three identical rows and plain RoPE.
    flat = torch.arange(t)
    a, _ = rope(flat, q.clone(), None)
    b, _ = rope(flat.expand(3, t), q.clone(), None)
    c, _ = RotaryEmbedding(d, d, 64, theta)(flat, q.clone(), None)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_rotary_cache_stays_fp32_when_the_module_is_cast() -> None:
    rope = MRotaryEmbedding(16, 16, 32, 1e4, [4, 2, 2]).to(torch.bfloat16)
    assert rope.cos_sin_cache.dtype == torch.float32
    torch.testing.assert_close(rope.cos_sin_cache, MRotaryEmbedding(16, 16, 32, 1e4, [4, 2, 2]).cos_sin_cache)


def test_vision_rotary_matches_transformers() -> None:
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLVisionRotaryEmbedding,
        apply_rotary_pos_emb_vision,
    )

    cfg = Qwen3VLVisionConfig(hidden_size=64, num_heads=2)
    hf = Qwen3VLVisionRotaryEmbedding(cfg)
    d, t = 32, 10
    positions = torch.randint(0, 20, (2, t))  # row 0: h, row 1: w
    q, k = torch.randn(t, 2, d), torch.randn(t, 2, d)
    cos, sin = hf(q, positions.T)  # transformers takes [N, 2] (h, w) ids
    q_ref, k_ref = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q_ours, k_ours = vision_rotary_embedding(d, 32, cfg.rope_parameters["rope_theta"])(positions, q.clone(), k.clone())
    torch.testing.assert_close(q_ours, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_ref, atol=1e-5, rtol=1e-5)


def test_sparse_moe_matches_transformers() -> None:
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    cfg = Qwen3VLMoeTextConfig(hidden_size=16, moe_intermediate_size=12, num_experts=6, num_experts_per_tok=2)
    ref = Qwen3VLMoeTextSparseMoeBlock(cfg)
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    ours = SparseMoeBlock(16, 12, 6, 2, norm_topk_prob=True)
    ours.gate.weight.data.copy_(ref.gate.weight)
    ours.experts.gate_up_proj.data.copy_(ref.experts.gate_up_proj)
    ours.experts.down_proj.data.copy_(ref.experts.down_proj)
    x = torch.randn(1, 20, 16)
    torch.testing.assert_close(ours(x[0]), ref(x)[0], atol=1e-5, rtol=1e-5)


def test_sparse_moe_with_shared_expert_matches_transformers() -> None:
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = Qwen3_5MoeTextConfig(
        hidden_size=16, moe_intermediate_size=12, num_experts=6, num_experts_per_tok=3,
        shared_expert_intermediate_size=20,
    )
    ref = Qwen3_5MoeSparseMoeBlock(cfg)
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    ours = SparseMoeBlock(16, 12, 6, 3, norm_topk_prob=True, shared_expert_intermediate_size=20)
    ours.gate.weight.data.copy_(ref.gate.weight)
    ours.experts.gate_up_proj.data.copy_(ref.experts.gate_up_proj)
    ours.experts.down_proj.data.copy_(ref.experts.down_proj)
    se = ref.shared_expert
    ours.shared_expert.gate_up_proj.weight.data.copy_(torch.cat([se.gate_proj.weight, se.up_proj.weight]))
    ours.shared_expert.down_proj.weight.data.copy_(se.down_proj.weight)
    ours.shared_expert_gate.weight.data.copy_(ref.shared_expert_gate.weight)
    x = torch.randn(1, 20, 16)
    torch.testing.assert_close(ours(x[0]), ref(x)[0], atol=1e-5, rtol=1e-5)


def test_moe_runs_only_routed_experts() -> None:
    moe = SparseMoeBlock(8, 4, 5, 1, norm_topk_prob=True)
    for p in moe.parameters():
        p.data.normal_()
    moe.experts.gate_up_proj.data[3] = float("nan")  # an expert no token is routed to
    moe.gate.weight.data[3] = -1e4
    x = torch.randn(6, 8).abs()
    assert torch.isfinite(moe(x)).all()


def _paged_metadata(ctx_before: list[int], new: list[int], tables: torch.Tensor, block: int) -> AttentionMetadata:
    slots = []
    for b, (c, n) in enumerate(zip(ctx_before, new)):
        for pos in range(c, c + n):
            slots.append(int(tables[b, pos // block]) * block + pos % block)
    total = [c + n for c, n in zip(ctx_before, new)]
    cu_q = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(total).cumsum(0).tolist()], dtype=torch.int32)
    return AttentionMetadata(
        cu_q, cu_k, max(new), max(total), torch.tensor(slots, dtype=torch.int64), tables,
        torch.tensor(total, dtype=torch.int32), decode_only=all(n == 1 for n in new),
    )


def test_attention_paged_prefill_and_decode_equal_packed() -> None:
    hq, hkv, d, block = 4, 2, 8, 4
    attn = Attention(hq, hkv, d, d**-0.5)
    lens = [7, 5]
    q, k, v = torch.randn(12, hq, d), torch.randn(12, hkv, d), torch.randn(12, hkv, d)
    full = attn(q, k, v, AttentionMetadata.packed(lens))
    cache = (torch.zeros(8, block, hkv, d), torch.zeros(8, block, hkv, d))
    tables = torch.tensor([[5, 1], [7, 2]], dtype=torch.int32)
    # Prefill all but the last token of each sequence, then decode the last one.
    first = torch.cat([torch.arange(0, 6), torch.arange(7, 11)])
    out = attn(q[first], k[first], v[first], _paged_metadata([0, 0], [6, 4], tables, block), cache)
    torch.testing.assert_close(out, full[first])
    last = torch.tensor([6, 11])
    out = attn(q[last], k[last], v[last], _paged_metadata([6, 4], [1, 1], tables, block), cache)
    torch.testing.assert_close(out, full[last])


def _split_at_decodes(meta: AttentionMetadata, new: list[int], total: list[int]) -> AttentionMetadata:
    """`meta` of a mixed step with its leading one-query sequences split off (what the engine builds)."""
    n = next(i for i, q in enumerate(new) if q != 1)
    part = PromptPart(
        n, meta.block_tables[:n], meta.seq_lens[:n], meta.block_tables[n:],
        torch.tensor([0, *torch.tensor(new[n:]).cumsum(0).tolist()], dtype=torch.int32, device=meta.seq_lens.device),
        torch.tensor([0, *torch.tensor(total[n:]).cumsum(0).tolist()], dtype=torch.int32, device=meta.seq_lens.device),
        max(new[n:]), max(total[n:]),
    )
    return dataclasses.replace(meta, prompt_part=part)


def _on(meta: AttentionMetadata, device: str) -> AttentionMetadata:
    fields = ("cu_seqlens_q", "cu_seqlens_k", "slot_mapping", "block_tables", "seq_lens")
    return dataclasses.replace(meta, **{f: getattr(meta, f).to(device) for f in fields})


def _mixed_step_outputs(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixed step (3 decode rows, then prompt chunks of 2 sequences, one with a cached prefix) run as
    one varlen call and split; and the packed attention of the full sequences at the same rows."""
    hq, hkv, d, block = 8, 2, 64, 16
    attn = Attention(hq, hkv, d, d**-0.5)
    lens = [37, 20, 64, 45, 19]  # full lengths; the step's new tokens are their last `new`
    new = [1, 1, 1, 13, 19]
    before = [n - m for n, m in zip(lens, new)]
    total = sum(lens)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(total, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    full = attn(q, k, v, AttentionMetadata.packed(lens, device))
    cache = tuple(torch.zeros(40, block, hkv, d, device=device, dtype=dtype) for _ in range(2))
    perm = torch.randperm(40, generator=g)
    tables = torch.stack([perm[i * 8 : (i + 1) * 8] for i in range(5)]).to(torch.int32).to(device)
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]
    old_rows = torch.cat([torch.arange(s, s + b) for s, b in zip(starts, before)]).to(device)
    attn(q[old_rows], k[old_rows], v[old_rows], _on(_paged_metadata([0] * 5, before, tables, block), device), cache)
    rows = torch.cat([torch.arange(s + b, s + n) for s, b, n in zip(starts, before, lens)]).to(device)
    meta = _on(_paged_metadata(before, new, tables, block), device)
    whole = attn(q[rows], k[rows], v[rows], meta, cache)
    split = attn(q[rows], k[rows], v[rows], _split_at_decodes(meta, new, lens), cache)
    return whole, split, full[rows]


def test_mixed_step_split_at_decode_rows_equals_one_varlen_call() -> None:
    whole, split, reference = _mixed_step_outputs("cpu", torch.float32)
    torch.testing.assert_close(whole, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_step_split_at_decode_rows_equals_one_varlen_call_gpu(dtype) -> None:
    whole, split, reference = _mixed_step_outputs("cuda", dtype)
    torch.testing.assert_close(split, reference, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(split, whole, atol=2e-2, rtol=2e-2)


def _assert_rounds_once(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """`got` is transformers' one rounding after the fp32 scale, up to the fp32 sum of squares
    (the kernel adds in another order: a rare last-bit flip in bf16); rounding the
    normalized value before the scale (Qwen3's order) would differ on a large share."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=0, rtol=1e-6)
        return
    torch.testing.assert_close(got, expected, atol=0, rtol=2**-7)  # at most one bf16 step
    assert (got != expected).float().mean().item() < 1e-3
    xf = x.float()
    twice = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight.to(x.dtype)
    assert (twice != expected).float().mean().item() > 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_offset_rms_norm_matches_transformers_qwen3_5_norm(dtype) -> None:
    """Qwen3.5's `(1 + w)` norm in bf16 rounds once, after the fp32 scale, as transformers does."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    from models.layers.layernorm import OffsetRMSNorm

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(256, generator=gen) * 0.3).to(torch.bfloat16)  # as a checkpoint stores it
    ref = Qwen3_5RMSNorm(256, eps=1e-6)
    ref.weight.data.copy_(w.float())
    ours = OffsetRMSNorm(256, eps=1e-6)
    ours.weight.weight_loader(ours.weight, w)
    x = (torch.randn(64, 256, generator=gen) * 3).to(dtype)
    r = (torch.randn(64, 256, generator=gen)).to(dtype)
    _assert_rounds_once(ours(x), ref(x), x, ours.weight)
    got, res = ours(x.clone(), r.clone())
    torch.testing.assert_close(res, x + r, atol=0, rtol=0)
    _assert_rounds_once(got, ref(x + r), x + r, ours.weight)
