"""Async scheduling: the host work of a step overlaps the GPU work of the step before.

`EngineConfig.async_scheduling`, one rank in process: a step
is launched, and while the GPU runs it the host schedules and launches the
next one, then reads the first one's tokens and streams them. The scheduler
counts each launched sampled token at once (a placeholder in the sequence's
output until it is read); the runner feeds it to the sequence's next step from the
device (a decode step, or the decode row of a step that also runs prompt chunks,
whose inputs it uploads without waiting for the GPU). Stops are applied when the tokens are read, one step late: a sequence
that stopped there computed one more token in the step already launched,
which is discarded (never emitted, never counted). Its blocks and state slot
are returned at once: every later step that could reuse them runs after the
launched one on the same CUDA stream. The next step is launched early only
when every running sequence (decoding, or in the middle of its prompt) samples
plain greedy (no penalties, logprobs or temperature: the draw and the
penalties read tokens on the host) and is not at its length limit (so the
extra token never needs a block or position beyond it), and no waiting
sequence was preempted holding an unread token (its recompute needs it);
new requests are admitted meanwhile. Every other step (sampling, preemption
recompute) first reads the launched step's tokens. Tensor parallelism (steps on worker actors) runs
synchronously.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from engine.launch import LaunchedStep
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.step import StepResult
from engine.timeline import StepRecord, ThreadUsage, count_rows

log = logging.getLogger("engine.engine")

PLACEHOLDER = -1  # a launched step's sampled token in a sequence's output until the host reads it


@dataclass(frozen=True, slots=True)
class InFlightStep:
    """A launched step whose tokens the host has not processed: where each placeholder sits
    (seq id -> index in its output tokens) and the host times of its launch."""

    out: SchedulerOutput
    launched: LaunchedStep
    placeholders: dict[int, int]
    times: tuple[float, float, float, float, float, float, int]  # top, locked, start, scheduled, built, launched, waiting
    usage: ThreadUsage  # the loop thread's, from schedule to launched


class OverlappedSteps:
    """The engine's step loop under async scheduling (a part of `Engine`, on its state:
    lock, scheduler, executor, what the runner knows, streams, timeline)."""

    def _launch_step(self) -> bool:
        """Launch the next step, then process the one launched before it. False: the loop ends."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            with self._lock:
                overlap = self._can_overlap()
            if not overlap:
                if not self._finish_launched(prev):
                    return False
                prev = None
        clock = time.monotonic
        top = clock()
        with self._lock:
            locked = clock()
            while prev is None and not self._closed and self._dead is None and not self.scheduler.has_work():
                self._work.wait()
            if self._closed or self._dead is not None:
                return False
            start, usage = clock(), ThreadUsage.now()
            out = self.scheduler.schedule() if self.scheduler.has_work() else SchedulerOutput([])
            if out.is_empty and prev is None:
                self._fail("the scheduler could not place any request (KV cache too small)")
                return False
            scheduled = clock()
            msg = self._message(out) if not out.is_empty else None
            built = clock()
            waiting = len(self.scheduler.waiting)
        if msg is not None:
            try:
                launched = self.executor.launch(msg)
            except Exception as exc:
                log.exception("engine step failed")
                with self._lock:
                    self._fail(f"engine step failed: {type(exc).__name__}: {exc}")
                return False
            with self._lock:
                placeholders = self._count_launched(out)
            self._inflight = InFlightStep(out, launched, placeholders,
                                       (top, locked, start, scheduled, built, clock(), waiting),
                                       ThreadUsage.now() - usage)
        return prev is None or self._finish_launched(prev)

    def _can_overlap(self) -> bool:
        """Whether the next step may launch before the step in flight is read (see the module doc)."""
        s = self.scheduler
        return all(map(self._steps_greedily, s.running)) and not any(map(self._holds_placeholder, s.waiting))

    def _steps_greedily(self, seq: Sequence) -> bool:
        """`seq`'s next step needs no token on the host: a decode (its input, if still on the device,
        is read there) or a prompt chunk (known), sampled plain greedy, short of its length limits."""
        return (seq.sampling.plain_greedy
                and seq.num_output_tokens < seq.max_tokens and seq.num_tokens < self.max_model_len)

    @staticmethod
    def _holds_placeholder(seq: Sequence) -> bool:
        """A waiting `seq` preempted with a token of the launched step unread: its recompute needs it."""
        return bool(seq.output_token_ids) and seq.output_token_ids[-1] == PLACEHOLDER

    def _count_launched(self, out: SchedulerOutput) -> dict[int, int]:
        """Advance the scheduler past a launched step: each sampled token is a placeholder the
        runner already knows (it keeps its own tokens). Returns seq id -> placeholder index."""
        self.scheduler.advance(out)
        placeholders = {}
        for item in out.scheduled:
            seq = item.seq
            if item.samples and not seq.is_finished:
                placeholders[seq.seq_id] = len(seq.output_token_ids)
                seq.output_token_ids.append(PLACEHOLDER)
                self._known[seq.seq_id].num_tokens += 1
        return placeholders

    def _finish_launched(self, item: InFlightStep) -> bool:
        """Read a launched step's tokens, then stream them and record the step. False: failed."""
        top, locked, start, scheduled, built, launched, waiting = item.times
        # Between this step's launch and its collect the loop launched the next step: that
        # host work is the next record's (schedule, message, execute), so this record's
        # execute is its launch plus the wait for its own results, never the next one's launch.
        collecting, usage = time.monotonic(), ThreadUsage.now()
        try:
            result = self.executor.collect(item.launched)
        except Exception as exc:
            log.exception("engine step failed")
            with self._lock:
                self._fail(f"engine step failed: {type(exc).__name__}: {exc}")
            return False
        collected = time.monotonic()
        with self._lock:
            relocked = time.monotonic()
            outputs = self._process_launched(item, result)
        end = time.monotonic()
        decode, prefill, prefill_tokens = count_rows(item.out.scheduled)
        self._timeline.append(StepRecord(
            start, end, start - locked, (locked - top) + (relocked - collected), scheduled - start,
            built - scheduled, (launched - built) + (collected - collecting), end - relocked,
            decode, prefill, prefill_tokens, outputs, waiting, item.usage + (ThreadUsage.now() - usage),
        ))
        return True

    def _process_launched(self, item: InFlightStep, result: StepResult) -> int:
        """Put the tokens in place of their placeholders, apply stops, deliver; how many delivered."""
        by_id = {s.seq.seq_id: s.seq for s in item.out.scheduled}
        outbox = []
        try:
            for seq_id, token, logprob in zip(result.seq_ids, result.token_ids, result.logprobs):
                seq = by_id[seq_id]
                if seq.is_finished:
                    continue  # aborted, or stopped a step earlier: this token is discarded
                index = item.placeholders[seq_id]
                seq.output_token_ids[index] = token
                reason = self._stop_reason(seq, token, index + 1)
                if reason is not None:
                    del seq.output_token_ids[index + 1 :]  # the launched step's token past the stop
                    self._finish(seq, reason)
                got = self._output(seq, [token], reason, [logprob] if seq.sampling.logprobs is not None else None)
                if got is not None:
                    outbox.append(got)
            self.scheduler.register(item.out)
        finally:
            self._deliver(outbox)
        return len(outbox)
