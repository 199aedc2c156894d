"""The runner's general step batch (prompt chunks, with or without decode rows): host lists -> device tensors.

A part of `ModelRunner` (a mixin on its state: sequences, config, device, placeholder ids).
Decode rows are plain ints (position, KV slot, token); only prompt chunks take tensor
slices (their mRoPE positions and image rows). Everything is built on the host and
uploaded with `_upload` (pinned, non-blocking on CUDA), so a step built while the one
before still runs on the GPU (async scheduling) does not wait for it.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch

from engine.positions import text_positions
from engine.seq_state import SeqState
from engine.step import SeqStep
from models.interface import MultimodalBatch
from models.layers.attention import AttentionMetadata, PromptPart

# Whether a mixed step's attention runs its leading decode rows on the paged decode kernel and
# only its prompt chunks on varlen (`PromptPart`); `SPLITVL_SPLIT_MIXED_ATTENTION=0` runs the
# whole step as one varlen call (benchmarks compare the two). Read once, at import.
SPLIT_MIXED_ATTENTION = os.environ.get("SPLITVL_SPLIT_MIXED_ATTENTION", "1") != "0"


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One step's model inputs. Shapes: input_ids [T]; positions [3, T]."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    mm: MultimodalBatch | None


class BatchBuilder:
    """`ModelRunner.build_batch` and the hybrid models' state metadata (a part of `ModelRunner`)."""

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor built for this step, on the runner's device without waiting for the GPU.

        A plain copy from pageable memory synchronizes with the stream, so it would wait for a
        launched step still running; a pinned one is queued behind it.
        """
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _positions(self, state: SeqState, start: int, end: int) -> torch.Tensor:
        p = state.num_prompt
        parts = []
        if start < p:
            parts.append(state.positions[:, start : min(end, p)])
        if end > p:
            lo = max(start, p)
            parts.append(text_positions(lo, end, state.mrope_delta))
        return torch.cat(parts, dim=1)

    def _mm_slice(self, state: SeqState, start: int, end: int) -> tuple[slice, int, int] | None:
        """Image-embedding rows of prompt tokens [start, end) and where they sit."""
        if state.mm is None or start >= state.num_prompt:
            return None
        end = min(end, state.num_prompt)
        lo, hi = int(state.image_rows[start]), int(state.image_rows[end])
        return (slice(lo, hi), start, end) if hi > lo else None

    def build_batch(self, steps: tuple[SeqStep, ...]) -> StepBatch:
        """The general step (prompt chunks, with or without decode rows). A decode row is plain ints
        (its position, slot and token); only prompt chunks take tensor slices (mRoPE positions, image rows)."""
        bs = self.config.block_size
        ids, slots, mask, embeds, deep = [], [], [], [], []
        positions: list[torch.Tensor | list[int]] = []  # prompt chunks' [3, n]; runs of decode rows' ints
        q_lens, k_lens, tables = [], [], []
        for s in steps:
            state = self.seqs[s.seq_id]
            end = s.start + s.num_new_tokens
            table = state.block_table
            if end > len(state.token_ids):  # a launched step's token not read yet: only a decode row takes it
                if s.num_new_tokens != 1 or end != len(state.token_ids) + 1:
                    raise RuntimeError(f"sequence {s.seq_id}: tokens up to {end} are not on the host")
                ids.append(self._device_token(state))
            else:
                ids.extend(state.token_ids[s.start : end])
            if s.num_new_tokens == 1 and s.start >= state.num_prompt:  # a decode row
                if not positions or not isinstance(positions[-1], list):
                    positions.append([])
                positions[-1].append(s.start + state.mrope_delta)
                slots.append(table[s.start // bs] * bs + s.start % bs)
                mask.append(False)
            else:
                positions.append(self._positions(state, s.start, end))
                slots.extend(table[i // bs] * bs + i % bs for i in range(s.start, end))
                mask.extend(self._chunk_mask(state, s.start, end, embeds, deep))
            q_lens.append(s.num_new_tokens)
            k_lens.append(end)
            tables.append(table)
        pos = [p if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=torch.int64).expand(3, -1)
               for p in positions]
        return self._assemble(steps, ids, pos, slots, mask, embeds, deep, q_lens, k_lens, tables)

    def _chunk_mask(self, state: SeqState, start: int, end: int, embeds: list, deep: list) -> list[bool]:
        """Which tokens of the chunk [start, end) are image rows; their embeddings go to `embeds` / `deep`."""
        m = [False] * (end - start)
        sl = self._mm_slice(state, start, end)
        if sl is not None:
            rows, lo, hi = sl
            m[: hi - start] = torch.isin(torch.tensor(state.token_ids[start:hi]), self.placeholder_ids).tolist()
            embeds.append(state.mm.image_embeds[rows])
            if state.mm.deepstack_embeds is not None:
                deep.append(state.mm.deepstack_embeds[:, rows])
        return m

    def _assemble(self, steps, ids, pos, slots, mask, embeds, deep, q_lens, k_lens, tables) -> StepBatch:
        up = self._upload
        cu_q = torch.tensor(list(itertools.accumulate(q_lens, initial=0)), dtype=torch.int32)
        cu_k = torch.tensor(list(itertools.accumulate(k_lens, initial=0)), dtype=torch.int32)
        width = max(len(t) for t in tables)
        block_tables = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        tables_dev = up(torch.from_numpy(block_tables))
        seq_lens = up(torch.tensor(k_lens, dtype=torch.int32))
        attn = AttentionMetadata(
            cu_seqlens_q=up(cu_q),
            cu_seqlens_k=up(cu_k),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(k_lens),
            slot_mapping=up(torch.tensor(slots, dtype=torch.int64)),
            block_tables=tables_dev,
            seq_lens=seq_lens,
            decode_only=all(q == 1 for q in q_lens),
            **self._state_metadata(steps),
            prompt_part=self._prompt_part(q_lens, k_lens, cu_q, cu_k, tables_dev, seq_lens)
            if SPLIT_MIXED_ATTENTION else None,
        )
        mm = None
        if embeds:
            host_mask = torch.tensor(mask, dtype=torch.bool)
            mm = MultimodalBatch(
                embeds=torch.cat(embeds),
                deepstack=torch.cat(deep, dim=1) if deep and len(deep) == len(embeds) else None,
                mask=up(host_mask),
                index=up(host_mask.nonzero().squeeze(1)),
            )
        input_ids = up(torch.tensor(ids, dtype=torch.int64))
        if min(ids) < 0:  # decode rows whose input token the launched step sampled: read on the device
            self._resolve(input_ids)
        return StepBatch(input_ids=input_ids, positions=up(torch.cat(pos, dim=1)), attn=attn, mm=mm)

    def _prompt_part(
        self, q_lens: list[int], k_lens: list[int], cu_q: torch.Tensor, cu_k: torch.Tensor,
        block_tables: torch.Tensor, seq_lens: torch.Tensor,
    ) -> PromptPart | None:
        """The prompt chunks after a mixed step's leading one-query sequences (the scheduler puts
        decodes first), or None when the step has no such rows or nothing after them. `cu_q` /
        `cu_k`: the step's host prefix sums; `block_tables` / `seq_lens`: its device tensors."""
        n = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
        if n == 0 or n == len(q_lens):
            return None
        return PromptPart(
            num_decodes=n,
            decode_block_tables=block_tables[:n],
            decode_seq_lens=seq_lens[:n],
            block_tables=block_tables[n:],
            cu_seqlens_q=self._upload(cu_q[n:] - cu_q[n]),
            cu_seqlens_k=self._upload(cu_k[n:] - cu_k[n]),
            max_seqlen_q=max(q_lens[n:]),
            max_seqlen_k=max(k_lens[n:]),
        )

    def _state_metadata(self, steps: tuple[SeqStep, ...]) -> dict[str, torch.Tensor]:
        """Hybrid models: each sequence's state slot, and whether it continues it.

        A sequence continues its slot whenever it has computed tokens before
        this step (a later prefill chunk or a decode); a preempted one restarts
        at token 0 and so from zeros. Prefix caching is off for hybrid models,
        so `start > 0` always means the slot holds tokens [0, start). When every
        sequence continues, `has_initial_state` is None (the model's cue for its
        single-token kernels on decode steps).
        """
        if not self.hybrid:
            return {}
        continues = [s.start > 0 for s in steps]
        return {
            "state_indices": self._upload(torch.tensor(self._state_slots(steps), dtype=torch.int32)),
            "has_initial_state": None if all(continues) else self._upload(torch.tensor(continues)),
        }

    def _state_slots(self, steps: tuple[SeqStep, ...]) -> list[int] | None:
        """Each step's linear-attention state slot (hybrid models), else None."""
        if not self.hybrid:
            return None
        slots = [s.state_slot for s in steps]
        if any(slot is None for slot in slots):
            raise RuntimeError("a hybrid model step without a state slot for every sequence")
        return slots
