"""The runner's decode fast path (persistent rows, staged in place) builds exactly the batch that
the general per-sequence path builds for the same steps, for dense and hybrid (state-slot) models."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import StaticInputs
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
    llm = LLM(tiny_checkpoint(arch), max_model_len=512, num_gpu_blocks=128, block_size=4, max_num_seqs=4)
    runner = llm.engine.executor.runner
    run, checked, seen_slots = runner._run, [], set()
    hidden = runner.model_config.text.hidden_size
    inputs = StaticInputs.allocate(4, 512, 4, hidden, runner.dtype, runner.device)

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
