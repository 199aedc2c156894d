"""The async engine of one LLM replica: validation, the step loop, output streams.

The steps run back to back on a thread of their own: schedule -> message ->
execute on every rank -> commit -> append sampled tokens, check stops, stream
deltas. The caller's event loop only adds and aborts requests and drains the
streams, so a loop busy with other work (a Serve replica streaming over Ray)
does not hold the next step back; its streams then receive several tokens at
once. One lock guards the scheduler and the bookkeeping; the model step runs
outside it. Async scheduling (one rank) launches the next step before reading
this one's tokens: `engine/overlap.py`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.block_manager import BlockManager, StateSlotManager
from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineInputError
from engine.executor import Executor, InProcessExecutor
from engine.overlap import InFlightStep, OverlappedSteps
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import MultimodalInputs, RequestOutput, Sequence
from engine.step import NewSequence, SeqStep, StepMessage, StepResult
from engine.stream import RequestStream, put_many
from engine.timeline import StepRecord, ThreadUsage, Timeline, TimelineRead, count_rows
from engine.validation import CheckedRequest, validate_request
from models.config import ModelConfig, load_model_config

if TYPE_CHECKING:  # Ray is imported only where TP > 1 needs it
    from ray.util.placement_group import PlacementGroup

__all__ = ["Engine", "EngineConfig", "EngineDeadError", "EngineInputError"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Known:
    """What the runners know of a sequence (to send only deltas)."""

    num_tokens: int
    num_blocks: int
    preemptions: int


class Engine(OverlappedSteps):
    """Continuous-batching engine over an in-process runner (TP 1) or TP worker actors."""

    def __init__(self, config: EngineConfig, executor: Executor | None = None,
                 placement_group: PlacementGroup | None = None):
        """`placement_group`: where TP > 1 puts its worker actors (`RayTPExecutor`'s default: the current one)."""
        self.config = config
        self.model_config: ModelConfig = load_model_config(config.model)
        text = self.model_config.text
        self.max_model_len = config.max_model_len or text.max_position_embeddings
        self.executor = executor or _make_executor(config, self.model_config, self.max_model_len, placement_group)
        hybrid = text.is_hybrid
        self._prefix_caching = config.enable_prefix_caching and not hybrid
        blocks = BlockManager(self.executor.num_blocks, config.block_size, enable_prefix_caching=self._prefix_caching)
        slots = StateSlotManager(config.max_num_seqs) if hybrid else None
        self.scheduler = Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens, slots)
        self._rng = random.Random(config.seed)
        self._next_seq_id = 0
        self._seqs: dict[str, Sequence] = {}
        self._streams: dict[str, RequestStream] = {}
        self._pending_new: dict[int, NewSequence] = {}
        self._known: dict[int, _Known] = {}
        self._pending_free: list[int] = []
        self._lock = threading.RLock()  # the scheduler and bookkeeping: step thread vs callers
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._dead: str | None = None
        self._closed = False
        self._timeline: Timeline[StepRecord] = Timeline(config.timeline_capacity)
        self._launches = config.async_scheduling and hasattr(self.executor, "launch")
        self._inflight: InFlightStep | None = None

    # ---- public API ----------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        mm_inputs: MultimodalInputs | None,
        sampling: SamplingParams,
    ) -> RequestStream:
        """Queue a request; iterate the returned stream for its `RequestOutput` deltas.

        Must be called from the event loop that consumes the stream.
        Raises:
            EngineInputError: invalid request (nothing is queued).
            EngineDeadError: the engine has failed or is shut down.
        """
        return self.add_requests([(request_id, prompt_token_ids, mm_inputs, sampling)])[0]

    def add_requests(
        self, requests: list[tuple[str, list[int], MultimodalInputs | None, SamplingParams]],
    ) -> list[RequestStream]:
        """Queue requests `(request_id, prompt_token_ids, mm_inputs, sampling)` at once: the step
        thread sees all of them or none, so the batches of an offline run do not depend on thread
        timing (greedy bf16 tokens are then repeatable run to run).

        Same contract as `add_request`; a bad request or a repeated id queues none of them.
        """
        if self._dead is not None or self._closed:
            raise EngineDeadError(self._dead or "the engine is shut down")
        checked = [
            validate_request(self.model_config, self.max_model_len, self.executor.num_blocks * self.config.block_size,
                             ids, mm, sampling, hash_images=self._prefix_caching)
            for _, ids, mm, sampling in requests
        ]
        with self._lock:
            if self._dead is not None or self._closed:
                raise EngineDeadError(self._dead or "the engine is shut down")
            seen: set[str] = set()
            for request_id, *_ in requests:  # one pass: an offline batch may hold thousands
                if request_id in self._seqs or request_id in seen:
                    raise EngineInputError(f"request id {request_id!r} is already running", param="request_id")
                seen.add(request_id)
            streams = [self._add(rid, c, mm, sampling) for (rid, _, mm, sampling), c in zip(requests, checked)]
            self._ensure_thread()
            self._work.notify()
        return streams

    def _add(self, request_id: str, checked: CheckedRequest, mm_inputs: MultimodalInputs | None,
             sampling: SamplingParams) -> RequestStream:
        prompt = checked.prompt_token_ids
        seq = Sequence(
            seq_id=self._next_seq_id, request_id=request_id,
            prompt_token_ids=list(prompt), sampling=sampling,
            max_tokens=checked.max_tokens, mm_inputs=mm_inputs, image_spans=checked.image_spans,
        )
        self._next_seq_id += 1
        seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
        self._pending_new[seq.seq_id] = NewSequence(
            seq.seq_id, tuple(prompt), checked.positions, checked.mrope_delta,
            sampling, seed, mm_inputs,
        )
        stream = self._open_stream(request_id)
        self._seqs[request_id] = seq
        self._streams[request_id] = stream
        self.scheduler.add(seq)
        return stream

    def abort(self, request_id: str) -> None:
        """End a request now: its blocks return at once and its stream ends with "abort"."""
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is None:
                return
            self._finish(seq, "abort")
            self._emit(seq, [], "abort", None)

    @property
    def executor_device(self) -> str:
        """Device of rank 0's model ("cpu" or "cuda")."""
        return self.config.device

    def is_healthy(self) -> bool:
        if self._dead is None and not self._closed and not self.executor.is_alive():
            with self._lock:
                self._fail("a tensor-parallel worker died")
        return self._dead is None and not self._closed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self.scheduler.stats()
        return {
            "healthy": self._dead is None and not self._closed,
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "num_free_blocks": s.num_free_blocks,
            "num_total_blocks": s.num_total_blocks,
            "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "num_free_state_slots": s.num_free_state_slots,
            "num_total_state_slots": s.num_total_state_slots,
        }

    def timeline(self, since: int = 0) -> TimelineRead[StepRecord]:
        """The records of the steps from cursor `since` on (engine/timeline.py); from any thread."""
        return self._timeline.read(since)

    def shutdown(self) -> None:
        """Abort everything, stop the loop, release the workers."""
        with self._lock:
            if self._closed:
                return
            for request_id in list(self._seqs):
                self.abort(request_id)
            self._closed = True
            self._work.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()  # the step in flight, if any
        self.executor.shutdown()

    # ---- the loop --------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._step_loop, name="splitvl-step", daemon=True)
            self._thread.start()

    def _step_loop(self) -> None:
        step = self._launch_step if self._launches else self._step
        with self._step_stream():
            while step():
                pass

    def _step_stream(self) -> contextlib.AbstractContextManager:
        """The CUDA stream of this thread's steps: a high-priority one (`EngineConfig.high_priority_stream`),
        else the default stream. The model, the KV cache and the captured graphs were made on the default
        stream: it is drained first."""
        config = self.config
        if not (config.high_priority_stream and config.device == "cuda" and config.tensor_parallel_size == 1):
            return contextlib.nullcontext()
        torch.cuda.synchronize()
        _, highest = torch.cuda.Stream.priority_range()
        return torch.cuda.stream(torch.cuda.Stream(priority=highest))

    def _step(self) -> bool:
        """Wait for work, run one step, record it on the timeline. False: the loop ends."""
        clock = time.monotonic
        top = clock()
        with self._lock:
            locked = clock()
            while not self._closed and self._dead is None and not self.scheduler.has_work():
                self._work.wait()
            if self._closed or self._dead is not None:
                return False
            start, usage = clock(), ThreadUsage.now()
            out = self.scheduler.schedule()
            if out.is_empty:
                self._fail("the scheduler could not place any request (KV cache too small)")
                return False
            scheduled = clock()
            msg = self._message(out)
            built = clock()
            waiting = len(self.scheduler.waiting)
        try:
            result = self.executor.execute(msg)
        except Exception as exc:  # a worker died, a step timed out or crashed
            log.exception("engine step failed")
            with self._lock:
                self._fail(f"engine step failed: {type(exc).__name__}: {exc}")
            return False
        executed = clock()
        with self._lock:
            relocked = clock()
            outputs = self._process(out, result)
        end = clock()
        decode, prefill, prefill_tokens = count_rows(out.scheduled)
        self._timeline.append(StepRecord(
            start, end, start - locked, (locked - top) + (relocked - executed), scheduled - start,
            built - scheduled, executed - built, end - relocked, decode, prefill, prefill_tokens, outputs, waiting,
            ThreadUsage.now() - usage,
        ))
        return True

    def _message(self, out: SchedulerOutput) -> StepMessage:
        new, steps = [], []
        for item in out.scheduled:
            seq = item.seq
            known = self._known.get(seq.seq_id)
            if known is None:
                new.append(self._pending_new.pop(seq.seq_id))
                known = self._known[seq.seq_id] = _Known(seq.num_prompt_tokens, 0, -1)
            appended = tuple(seq.output_token_ids[known.num_tokens - seq.num_prompt_tokens :])
            reset = known.preemptions != seq.num_preemptions
            blocks = tuple(seq.block_table if reset else seq.block_table[known.num_blocks :])
            known.num_tokens, known.num_blocks = seq.num_tokens, len(seq.block_table)
            known.preemptions = seq.num_preemptions
            steps.append(SeqStep(
                seq.seq_id, item.start, item.num_new_tokens, appended, blocks, reset,
                item.samples, seq.state_slot,
            ))
        freed, self._pending_free = tuple(self._pending_free), []
        return StepMessage(tuple(new), tuple(steps), freed)

    def _process(self, out: SchedulerOutput, result: StepResult | None) -> int:
        """Commit the step, append its tokens, deliver the deltas; how many were delivered."""
        self.scheduler.commit(out)
        if result is None:
            return 0
        by_id = {item.seq.seq_id: item.seq for item in out.scheduled}
        outbox = []  # delivered together (one wake-up per consumer loop), still under the lock
        try:
            for seq_id, token, logprob in zip(result.seq_ids, result.token_ids, result.logprobs):
                seq = by_id[seq_id]
                if seq.is_finished:
                    continue  # aborted while the step ran
                seq.output_token_ids.append(token)
                reason = self._stop_reason(seq, token, seq.num_output_tokens)
                if reason is not None:
                    self._finish(seq, reason)
                item = self._output(seq, [token], reason, [logprob] if seq.sampling.logprobs is not None else None)
                if item is not None:
                    outbox.append(item)
        finally:
            self._deliver(outbox)
        return len(outbox)

    def _open_stream(self, request_id: str) -> RequestStream:
        """Where `request_id`'s outputs go (`engine/core/child.py` sends them to another process)."""
        return RequestStream(request_id, self.abort)

    def _deliver(self, outbox: list[tuple[RequestStream, RequestOutput]]) -> None:
        """Hand one step's outputs (or one abort or error) to their streams, from under the lock."""
        put_many(outbox)

    def _stop_reason(self, seq: Sequence, token: int, num_output: int) -> str | None:
        """Why `seq` ends with `token` as its `num_output`-th output token (None: it goes on)."""
        params = seq.sampling
        if not params.ignore_eos and token in self.model_config.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
        if num_output >= seq.max_tokens or seq.num_prompt_tokens + num_output >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._seqs.pop(seq.request_id, None)
        self._pending_new.pop(seq.seq_id, None)
        if self._known.pop(seq.seq_id, None) is not None:
            self._pending_free.append(seq.seq_id)

    def _output(
        self, seq: Sequence, tokens: list[int], reason: str | None, logprobs, error: str | None = None,
    ) -> tuple[RequestStream, RequestOutput] | None:
        """`seq`'s delta and the stream it goes to (None once nobody listens); a final one closes the stream."""
        stream = self._streams.get(seq.request_id) if reason is None else self._streams.pop(seq.request_id, None)
        if stream is None:
            return None
        return stream, RequestOutput(
            seq.request_id, tokens, reason, logprobs, seq.num_prompt_tokens, seq.num_cached_tokens, error,
        )

    def _emit(self, seq: Sequence, tokens: list[int], reason: str | None, logprobs, error: str | None = None) -> None:
        item = self._output(seq, tokens, reason, logprobs, error)
        if item is not None:
            self._deliver([item])

    def _fail(self, message: str) -> None:
        """Mark the engine dead and end every pending request with an error."""
        if self._dead is not None:
            return
        self._dead = message
        log.error("engine is unhealthy: %s", message)
        for seq in list(self._seqs.values()):
            self._finish(seq, "error")
            self._emit(seq, [], "error", None, error=message)
        self.executor.on_failure()


def _make_executor(config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                   placement_group: PlacementGroup | None) -> Executor:
    if config.tensor_parallel_size == 1:
        return InProcessExecutor(config, model_config, max_model_len)
    from engine.worker import RayTPExecutor

    return RayTPExecutor(config, max_model_len, placement_group)
