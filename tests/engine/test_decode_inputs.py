"""The runner's decode fast path (persistent rows, staged in place) builds exactly the batch that
the general per-sequence path builds for the same steps, for dense and hybrid (state-slot) models."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphs, StaticInputs, bucket_sizes, width_buckets
from tests.engine.helpers import TEXT, image, prompt_ids


def _assert_same_batch(fast, ref) -> None:
    assert torch.equal(fast.input_ids, ref.input_ids)
    assert torch.equal(fast.positions, ref.positions)
    a, b = fast.attn, ref.attn
    for name in ("cu_seqlens_q", "cu_seqlens_k", "slot_mapping", "block_tables", "seq_lens"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.max_seqlen_q, a.max_seqlen_k, a.decode_only) == (b.max_seqlen_q, b.max_seqlen_k, b.decode_only)
    assert fast.mm is None and ref.mm is None
    if b.state_indices is None:
        assert a.state_indices is None
    else:
        assert a.state_indices.dtype == torch.int32 and torch.equal(a.state_indices, b.state_indices)
    # Decode rows all continue their slots: no tensor for the model to read.
    assert a.has_initial_state is None and b.has_initial_state is None


def _assert_graph_inputs_match(inputs: StaticInputs, host, b: int, ref) -> None:
    """What a captured graph would read for a staged step (padded to a bucket) equals the general batch."""
    inputs.load(host)
    attn = inputs.metadata(host.size, host.width)
    longs = inputs.longs_of(host.size)
    assert torch.equal(longs[0, :b], ref.input_ids) and torch.equal(longs[1:4, :b], ref.positions)
    assert torch.equal(attn.slot_mapping[:b], ref.attn.slot_mapping)
    assert torch.equal(attn.block_tables[:b], ref.attn.block_tables)
    assert torch.equal(attn.seq_lens[:b], ref.attn.seq_lens)
    assert attn.has_initial_state is None
    if ref.attn.state_indices is not None:
        assert torch.equal(attn.state_indices[:b], ref.attn.state_indices)
    # Padding rows write nowhere (KV cache or state pools) and attend to one token.
    assert (attn.slot_mapping[b:] == -1).all() and (attn.seq_lens[b:] == 1).all()
    assert (attn.state_indices[b:] == -1).all()


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_decode_inputs_match_the_general_batch(tiny_checkpoint, arch):
    # Small blocks and a varied batch: tables grow, rows (and state slots) free and get reused,
    # mRoPE offsets differ.
    # Synchronous steps: the general batch is built from the input tokens on the host.
    llm = LLM(tiny_checkpoint(arch), max_model_len=512, num_gpu_blocks=128, block_size=4, max_num_seqs=4,
              async_scheduling=False)
    runner = llm.engine.executor.runner
    run, checked, seen_slots = runner._run, [], set()
    inputs = StaticInputs.allocate(4, 512, 4, runner.model_config.text.vocab_size, runner.dtype, runner.device)

    def checking_run(steps):
        decode = runner._decode_rows(steps)
        if decode is not None:
            rows, starts, ids = decode
            slots = runner._state_slots(steps)
            fast = runner._decode_batch(runner.decode_inputs.stage(rows, starts, ids, state_slots=slots),
                                        len(rows), max(starts) + 1)
            ref = runner.build_batch(steps)
            _assert_same_batch(fast, ref)
            padded = runner.decode_inputs.stage(rows, starts, ids, pad_to=4, state_slots=slots)
            _assert_graph_inputs_match(inputs, padded, len(rows), ref)
            checked.append(len(rows))
            seen_slots.update(slots or ())
        return run(steps)

    runner._run = checking_run
    tok = llm.tokenizer
    prompts = [
        {"prompt_token_ids": prompt_ids(tok, TEXT, 1), "images": [image(64, 96, 0)]},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 0)},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 2), "images": [image(96, 64, 1), image(64, 64, 2)]},
        {"prompt_token_ids": prompt_ids(tok, TEXT[:20], 0)},
        {"prompt_token_ids": prompt_ids(tok, TEXT, 0)[:5]},
    ]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3, 12, 6, 5)]
    try:
        outs = llm.generate(prompts, params)
    finally:
        runner._run = run
        llm.shutdown()
    assert [len(o.token_ids) for o in outs] == [9, 3, 12, 6, 5]
    assert max(checked) == 4 and min(checked) < 4  # full and partial decode batches both went through
    assert runner.hybrid == bool(seen_slots)


class _EagerReplay:
    """Stands in for a captured graph on CPU: runs the forward a graph would capture, over the static views."""

    def __init__(self, forward, inputs: StaticInputs, size: int, width: int, sizes: list[int]):
        self.forward, self.inputs, self.size, self.width, self.sizes = forward, inputs, size, width, sizes

    def replay(self) -> None:
        self.inputs.run(self.forward, self.size, self.width)
        self.sizes.append(self.size)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "qwen3_vl"])
def test_decode_through_static_inputs_equals_general_path(tiny_checkpoint, arch):
    """What the graphs compute (static buffers, padded buckets, padding rows at KV/state slot -1),
    run eagerly on CPU, generates the same tokens as the general path, with rows and slots reused:
    greedy rows from the graph's own argmax, sampled rows and logprobs from its logits."""
    tok_len, max_len, bs = (9, 3, 12, 6, 5), 512, 4
    with LLM(tiny_checkpoint(arch), max_model_len=max_len, num_gpu_blocks=128, block_size=bs, max_num_seqs=4) as llm:
        tok = llm.tokenizer
        prompts = [
            {"prompt_token_ids": prompt_ids(tok, TEXT, 1), "images": [image(64, 96, 0)]},
            {"prompt_token_ids": prompt_ids(tok, TEXT, 0)},
            {"prompt_token_ids": prompt_ids(tok, TEXT[:20], 0)},
            {"prompt_token_ids": prompt_ids(tok, (TEXT + " ") * 3, 0)},
            {"prompt_token_ids": prompt_ids(tok, TEXT, 0)[:5]},
        ]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in tok_len]
        sampled = [SamplingParams(max_tokens=n, temperature=0.8, top_k=20, seed=i, ignore_eos=True, logprobs=2)
                   for i, n in enumerate(tok_len)]
        want = [o.token_ids for o in llm.generate(prompts, params)]
        want_sampled = llm.generate(prompts, sampled)
        runner = llm.engine.executor.runner
        inputs = StaticInputs.allocate(4, max_len, bs, runner.model_config.text.vocab_size, runner.dtype,
                                       runner.device)
        sizes: list[int] = []
        replays = {(size, width): _EagerReplay(runner._decode_logits, inputs, size, width, sizes)
                   for size in bucket_sizes(4) for width in width_buckets(inputs.max_blocks, bs)}
        runner.graphs = DecodeGraphs(inputs, replays)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        graph_steps = len(sizes)
        got_sampled = llm.generate(prompts, sampled)
    assert got == want
    assert 4 in sizes[:graph_steps] and graph_steps >= 10
    assert [o.token_ids for o in got_sampled] == [o.token_ids for o in want_sampled]
    for g, w in zip(got_sampled, want_sampled):
        assert [lp.top_ids for lp in g.logprobs] == [lp.top_ids for lp in w.logprobs]
        torch.testing.assert_close([lp.logprob for lp in g.logprobs], [lp.logprob for lp in w.logprobs],
                                   rtol=1e-5, atol=1e-5)  # padded-batch GEMMs round differently
