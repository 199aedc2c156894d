"""The model runner of one TP rank: the only engine file that touches the model/device.

It caches each sequence's state (tokens, prompt positions, image embeddings,
block table, sampling generator) from the step messages, builds one step's
batch tensors (`input_ids`, `positions [3, T]`, `AttentionMetadata`,
`MultimodalBatch`), runs the decoder over the paged KV cache, and on rank 0
samples the next token of every sequence that reached its end this step.
Decode-only steps take a fast path: inputs staged in place from persistent
per-sequence rows (`engine/decode_inputs.py`), a CUDA graph where one is
captured (the decoder, the LM head and the greedy argmax in one replay), and
a bare argmax when every row is plain greedy.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from engine.batch_builder import BatchBuilder, StepBatch
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, StaticInputs
from engine.decode_inputs import DecodeInputs, HostDecodeBatch
from engine.launch import StepLauncher
from engine.kv_cache import CacheLayout, LayerCache, cuda_kv_budget
from engine.sampler import SampleRow, sample, sample_greedy
from engine.seq_state import SeqState
from engine.sequence import MultimodalInputs
from engine.step import NewSequence, SeqStep, StepMessage, StepResult
from models.config import ModelConfig, load_model_config
from models.layers.attention import AttentionMetadata
from models.layers.parallel import ParallelContext
from models.loader import fill_weights, weight_bytes
from models.registry import build_language_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepLogits:
    """The LM head's output over one step's sampled rows.

    Shapes: logits [N, V] model dtype; greedy [N] int64 on the device (their argmax,
    computed inside a decode graph) or None (the sampler takes its own argmax).
    """

    logits: torch.Tensor
    greedy: torch.Tensor | None = None


class ModelRunner(BatchBuilder, StepLauncher):
    """Owns the model shard and the KV cache of one rank."""

    def __init__(self, config: EngineConfig, parallel: ParallelContext, model_config: ModelConfig | None = None):
        self.config = config
        self.parallel = parallel
        self.model_config = model_config or load_model_config(config.model)
        cuda = config.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.dtype = config.torch_dtype
        # Image and video pads: the rows the vision embeddings replace.
        self.placeholder_ids = torch.tensor(self.model_config.placeholder_token_ids, dtype=torch.int64)
        # Qwen3.5: linear-attention layers keep per-sequence state slots beside the paged KV.
        self.hybrid = self.model_config.text.is_hybrid
        began = time.perf_counter()
        self.model = build_language_model(self.model_config, parallel, self.dtype, self.device)
        fill_weights(self.model, config.model, config.load_format, self.model_config.text.initializer_range,
                     config.seed, parallel.tp_rank)
        self.model.eval()
        log.info("%s%s weights (%s, %.2f GiB) on %s in %.1f s", self._rank(), self.model_config.architecture,
                 config.load_format, weight_bytes(self.model) / 2**30, self.device, time.perf_counter() - began)
        self.seqs: dict[int, SeqState] = {}
        self.decode_inputs = DecodeInputs(config.block_size, self.device)
        self.cache_layout = self._cache_layout()
        self.kv_caches: list[LayerCache] = []
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None
        # Launched steps: how many, and the device ids the latest plain-greedy one sampled.
        self._launches = 0
        self._last: tuple[int, torch.Tensor] | None = None
        self._host_ids = [torch.zeros(config.max_num_seqs, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]

    # ---- setup -------------------------------------------------------------------

    def _cache_layout(self) -> CacheLayout:
        full = tuple(kind == "full_attention" for kind in self.model.layer_types)
        conv, recurrent = self.model.state_shapes() or ((), ())
        return CacheLayout(
            full_attention=full, block_size=self.config.block_size, num_kv_heads=self.model.num_kv_heads,
            head_dim=self.model_config.text.head_dim, max_num_seqs=self.config.max_num_seqs,
            conv_state=tuple(conv), recurrent_state=tuple(recurrent), dtype=self.dtype,
        )

    def profile_num_blocks(self, max_model_len: int) -> int:
        """KV blocks this rank can hold: `num_gpu_blocks` if set; else from CUDA memory after a
        profiling pass, or from `cpu_kv_cache_gb`."""
        cfg = self.config
        if cfg.num_gpu_blocks is not None:
            return cfg.num_gpu_blocks
        if self.device.type != "cuda":
            # More than every running sequence at full length is never used on CPU.
            cap = cfg.max_num_seqs * -(-max_model_len // cfg.block_size) + 1
            return self.cache_layout.num_blocks(cfg.cpu_kv_cache_gb * 2**30, cap)
        budget = cuda_kv_budget(
            lambda ids, pos, attn: self.model(ids, pos, attn, None, None), self.model.compute_logits,
            vocab_size=self.model_config.text.vocab_size, num_tokens=cfg.max_num_batched_tokens,
            max_model_len=max_model_len, logit_rows=cfg.max_num_seqs,
            utilization=cfg.gpu_memory_utilization, device=self.device,
        )
        return self.cache_layout.num_blocks(budget)

    def init_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = self.cache_layout.allocate(num_blocks, self.device)
        cache_bytes = num_blocks * self.cache_layout.block_bytes + self.cache_layout.state_bytes
        log.info("%sKV cache: %d blocks of %d tokens (%d tokens, %.2f GiB with the state pools)", self._rank(),
                 num_blocks, self.config.block_size, num_blocks * self.config.block_size, cache_bytes / 2**30)
        if self.captures_decode_graphs():
            began = time.perf_counter()
            inputs = StaticInputs.allocate(
                self.config.max_num_seqs, max_model_len, self.config.block_size,
                self.model_config.text.vocab_size, self.dtype, self.device,
            )
            self.graphs = DecodeGraphs.capture(self._decode_logits, inputs)
            if self.graphs is not None:
                log.info("%scaptured %d decode CUDA graphs (batch sizes up to %d) in %.1f s", self._rank(),
                         len(self.graphs.graphs), self.config.max_num_seqs, time.perf_counter() - began)

    def _rank(self) -> str:
        """A log line's prefix: the TP rank, where there are several."""
        return f"rank {self.parallel.tp_rank}: " if self.parallel.tp_size > 1 else ""

    def captures_decode_graphs(self) -> bool:
        """Whether decode steps run as CUDA graphs: on CUDA, not `enforce_eager`, and a model
        whose decode step can be captured (its `supports_cuda_graphs`)."""
        return self.device.type == "cuda" and not self.config.enforce_eager and self.model.supports_cuda_graphs

    def _decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """A text-only step over the KV cache (what the decode graphs capture). Shapes: hidden [T, H]."""
        return self.model(input_ids, positions, attn, self.kv_caches, None)

    def _decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """What the decode graphs capture: the decode step and the LM head. Shapes: logits [T, V] model dtype."""
        return self.model.compute_logits(self._decode_forward(input_ids, positions, attn), None)

    def close(self) -> None:
        """Drop the KV cache, graphs and sequence state, and return the device memory."""
        self.graphs = None
        self.kv_caches = []
        self.seqs.clear()
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # ---- per-step state ----------------------------------------------------------

    def _own(self, embeds: torch.Tensor) -> torch.Tensor:
        """A request's embeddings on this runner's device, their memory held for this thread's stream.

        Made on another stream (the replica's event loop, an in-process vision tower), they are freed
        by whichever thread drops them last: `record_stream` keeps the caching allocator from handing
        their memory out again before the steps queued here that read them have run.
        """
        embeds = embeds.to(self.device, self.dtype)
        if embeds.is_cuda:
            embeds.record_stream(torch.cuda.current_stream(embeds.device))
        return embeds

    def _add(self, new: NewSequence) -> None:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(new.generator_seed)
        mm, rows = new.mm, None
        if mm is not None:
            mm = MultimodalInputs(
                self._own(mm.image_embeds),
                None if mm.deepstack_embeds is None else self._own(mm.deepstack_embeds),
                mm.image_grid_thw,
                mm.image_hashes,
            )
            is_img = torch.isin(torch.tensor(new.prompt_token_ids), self.placeholder_ids)
            rows = torch.zeros(len(new.prompt_token_ids) + 1, dtype=torch.int64)
            rows[1:] = torch.cumsum(is_img, 0)
        sp = new.sampling
        self.seqs[new.seq_id] = SeqState(
            list(new.prompt_token_ids), len(new.prompt_token_ids), new.positions, new.mrope_delta,
            new, gen, mm, rows, row=self.decode_inputs.add(new.mrope_delta),
            plain_greedy=sp.plain_greedy,
        )

    def _update(self, msg: StepMessage) -> None:
        for seq_id in msg.freed_seq_ids:
            state = self.seqs.pop(seq_id, None)
            if state is not None:
                self.decode_inputs.free(state.row)
        for new in msg.new_seqs:
            self._add(new)
        for s in msg.steps:
            state = self.seqs[s.seq_id]
            state.token_ids.extend(s.appended_token_ids)
            if s.reset_blocks:
                state.block_table = list(s.block_ids)
            else:
                state.block_table.extend(s.block_ids)
            if s.block_ids or s.reset_blocks:
                first = len(state.block_table) - len(s.block_ids)
                self.decode_inputs.write_blocks(state.row, first, s.block_ids, reset=s.reset_blocks)

    # ---- the step ----------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, msg: StepMessage) -> StepResult | None:
        """Run one step. Every rank must call it with the same message; rank 0 returns the tokens."""
        self._update(msg)
        head = self._run(msg.steps) if msg.steps else None
        if self.parallel.tp_rank != 0:
            return None
        return StepResult((), (), ()) if head is None else self._sample(msg.steps, head)

    def _sample(self, steps: tuple[SeqStep, ...], head: StepLogits) -> StepResult:
        sampled = [s for s in steps if s.sample]
        states = [self.seqs[s.seq_id] for s in sampled]
        seq_ids = tuple(s.seq_id for s in sampled)
        if all(st.plain_greedy for st in states):
            return StepResult(seq_ids, tuple(sample_greedy(head.logits, head.greedy)), (None,) * len(states))
        rows = []
        for st in states:
            # Only the penalties read the history: skip copying it for every other row.
            if st.new.sampling.has_penalties:
                prompt, output = st.token_ids[: st.num_prompt], st.token_ids[st.num_prompt :]
            else:
                prompt, output = [], []
            rows.append(SampleRow(st.new.sampling, prompt, output, st.generator))
        out = sample(head.logits, rows)
        return StepResult(seq_ids, tuple(out.token_ids), tuple(out.logprobs))

    def _sample_rows(self, steps: tuple[SeqStep, ...]) -> torch.Tensor | None:
        """Row of each sampled sequence's last token in the step's hidden [T, H]; None when
        every step is one token that samples (every row)."""
        if all(s.sample and s.num_new_tokens == 1 for s in steps):
            return None
        ends = itertools.accumulate(s.num_new_tokens for s in steps)
        picked = [end - 1 for s, end in zip(steps, ends) if s.sample]
        return self._upload(torch.tensor(picked, dtype=torch.int64))

    def _run(self, steps: tuple[SeqStep, ...]) -> StepLogits | None:
        """The model over this step's tokens and the LM head over its sampled rows; None when no
        row samples (prompt chunks only). The logits stay in the model dtype: the greedy argmax
        reads them as they are, `sample` makes its own fp32 copy."""
        samples = any(s.sample for s in steps)
        # Built before the forward is launched: a blocking host-to-device copy would wait for it.
        rows = self._sample_rows(steps) if samples else None
        decode = self._decode_rows(steps)
        if decode is None:
            batch = self.build_batch(steps)
            hidden = self.model(batch.input_ids, batch.positions, batch.attn, self.kv_caches, batch.mm)
        else:
            hidden = self._decode(steps, *decode)
            if isinstance(hidden, StepLogits):  # a graph ran the LM head over every row
                return hidden if rows is None else StepLogits(hidden.logits[rows], hidden.greedy[rows])
        if not samples:
            return None
        return StepLogits(self.model.compute_logits(hidden if rows is None else hidden[rows], None))

    def _decode(self, steps: tuple[SeqStep, ...], rows: list[int], starts: list[int],
                token_ids: list[int]) -> torch.Tensor | StepLogits:
        """A decode step from the staged inputs: a graph replay (logits and greedy ids of every
        row) where one is captured, else eagerly (hidden [B, H])."""
        b = len(rows)
        size = self.graphs.batch_bucket(b) if self.graphs is not None else None
        host = self.decode_inputs.stage(rows, starts, token_ids, pad_to=size or 0,
                                        state_slots=self._state_slots(steps))
        on_device = min(token_ids) < 0  # input ids the previous launch sampled: resolved on the device
        if size is not None:
            def copied() -> None:
                self.decode_inputs.mark_copied()
                if on_device:
                    self._resolve(self.graphs.inputs.longs_of(size)[0, :b])

            out = self.graphs.replay(host, b, copied)
            if out is not None:
                return StepLogits(*out)
        batch = self._decode_batch(host, b, max(starts) + 1)
        if on_device:
            self._resolve(batch.input_ids)
        return self._decode_forward(batch.input_ids, batch.positions, batch.attn)

    def _decode_rows(self, steps: tuple[SeqStep, ...]) -> tuple[list[int], list[int], list[int]] | None:
        """(state rows, token indices, token ids) when every step decodes one generated token, else None."""
        rows, starts, token_ids = [], [], []
        seqs = self.seqs
        for s in steps:
            st = seqs[s.seq_id]
            if s.num_new_tokens != 1 or s.start < st.num_prompt:
                return None  # prompt tokens may be image tokens or carry mRoPE image positions
            rows.append(st.row)
            starts.append(s.start)
            token_ids.append(st.token_ids[s.start] if s.start < len(st.token_ids) else self._device_token(st))
        return rows, starts, token_ids

    def _decode_batch(self, host: HostDecodeBatch, b: int, max_len: int) -> StepBatch:
        """Device tensors of a staged decode step that runs eagerly (no graph for it)."""
        dev = self.device
        longs, ints, tables = host.longs[:, :b], host.ints[:, :b], host.block_tables[:b]
        if dev.type == "cuda":
            longs, ints, tables = (t.to(dev, non_blocking=True) for t in (longs, ints, tables))
            self.decode_inputs.mark_copied()
        else:  # the staging arrays are overwritten next step
            longs, ints, tables = longs.clone(), ints.clone(), tables.clone()
        seq_lens = ints[0]
        cu_k = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        cu_k[1:] = torch.cumsum(seq_lens, 0)
        attn = AttentionMetadata(
            cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32, device=dev),
            cu_seqlens_k=cu_k,
            max_seqlen_q=1,
            max_seqlen_k=max_len,
            slot_mapping=longs[4],
            block_tables=tables,
            seq_lens=seq_lens,
            decode_only=True,
            # Every decode row continues its slot (has_initial_state None); non-hybrid models ignore both.
            state_indices=ints[1] if self.hybrid else None,
        )
        return StepBatch(longs[0], longs[1:4], attn, None)
