"""Continuous batching: decodes first, then chunked prefill into the token budget.

Each step the scheduler picks, for every sequence it runs, how many of its
not-yet-computed tokens to process (`num_new_tokens`): 1 for a decode, a chunk
of the prompt (or of prompt + generated tokens after a preemption) otherwise.
When KV blocks run out, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the front of the queue to
be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager, StateSlotManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first token index computed this step
    num_new_tokens: int
    samples: bool  # this step reaches the end of the sequence: a token is sampled

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return cls(seq, start, num_new_tokens, start + num_new_tokens == seq.num_tokens)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_free_state_slots: int = 0  # linear-attention state slots (hybrid models)
    num_total_state_slots: int = 0


class Scheduler:
    """Owns the waiting queue, the running list and the block manager."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        state_slots: StateSlotManager | None = None,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.state_slots = state_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        b = self.blocks.stats()
        slots = self.state_slots
        return SchedulerStats(
            len(self.running), len(self.waiting), b.num_free_blocks, b.num_total_blocks,
            self.num_preemptions, b.prefix_cache_queries, b.prefix_cache_hits,
            slots.num_free_slots if slots else 0, slots.num_slots if slots else 0,
        )

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. Running sequences first (decodes, then partial prefills)."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        order = sorted(self.running, key=lambda s: s.remaining_prefill > 1)  # stable: decodes first
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            chunk = min(seq.remaining_prefill, budget)
            if not self._reserve(seq, chunk, scheduled, preempted):
                continue
            scheduled.append(ScheduledSeq.of(seq, chunk))
            budget -= chunk
        if not preempted:
            budget = self._admit(budget, scheduled)
        return SchedulerOutput(scheduled)

    def _reserve(
        self, seq: Sequence, chunk: int, scheduled: list[ScheduledSeq], preempted: list[Sequence]
    ) -> bool:
        """Blocks for `chunk` more tokens of a running `seq`, preempting others if needed."""
        while not self.blocks.allocate(seq, chunk):
            victim = self._pick_victim(seq, scheduled)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _pick_victim(self, seq: Sequence, scheduled: list[ScheduledSeq]) -> Sequence:
        """The most recently admitted running sequence not already in this step."""
        taken = {s.seq.seq_id for s in scheduled}
        for cand in reversed(self.running):
            if cand.seq_id not in taken:
                return cand
        return seq

    def _admit(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        """Move waiting sequences into the batch, oldest first, while budget and blocks last."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.state_slots is not None and self.state_slots.num_free_slots == 0:
                break
            if not self.blocks.allocate(seq, min(seq.remaining_prefill, budget)):
                break
            chunk = min(seq.remaining_prefill, budget)  # after any prefix-cache hit
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if self.state_slots is not None:
                seq.state_slot = self.state_slots.allocate(seq.seq_id)
            self.running.append(seq)
            scheduled.append(ScheduledSeq.of(seq, chunk))
            budget -= chunk
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        self._release_slot(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release_slot(self, seq: Sequence) -> None:
        if self.state_slots is not None:
            self.state_slots.free(seq.seq_id)
        seq.state_slot = None

    def commit(self, out: SchedulerOutput) -> None:
        """Advance the computed-token counts after the step ran; register full blocks."""
        self.advance(out)
        self.register(out)

    def advance(self, out: SchedulerOutput) -> None:
        """The computed-token counts of a step that ran or is running: what the next schedule reads."""
        for item in out.scheduled:
            if not item.seq.is_finished:  # aborted while the step ran
                item.seq.num_computed_tokens = item.start + item.num_new_tokens

    def register(self, out: SchedulerOutput) -> None:
        """Prefix-cache hashes of the blocks that became full (every token of them known on the host)."""
        for item in out.scheduled:
            if not item.seq.is_finished:
                self.blocks.commit(item.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (stop, length, abort, error) and return its blocks at once."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self._release_slot(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
