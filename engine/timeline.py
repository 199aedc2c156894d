"""Per-step timeline of an LLM replica (and of its vision encoder): bounded, always on.

The engine appends one `StepRecord` per step to a `Timeline`, a fixed-size ring
buffer; the vision replica appends one `EncodeRecord` per tower call to one of
its own. A reader takes the records since a cursor (`Timeline.read`), so a
benchmark reads the records of one load level without resetting anything.

Recording is always on: a step costs a few `time.monotonic()` calls, two
`getrusage` calls (the step loop thread's CPU time and context switches) and one
small record (about a microsecond, `tests/engine/test_timeline.py` prints it),
against steps of milliseconds; a switch would only double the step loop's
code. Times are `time.monotonic()` seconds, which on Linux is CLOCK_MONOTONIC,
shared by every process of a node: records of the LLM and vision replicas on one
node can be laid on one time axis.
"""

from __future__ import annotations

import resource
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from engine.scheduler import ScheduledSeq

R = TypeVar("R")

DEFAULT_CAPACITY = 4096
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)  # Linux only
MARK = 1 << 62  # a cursor past any end: reading from it returns nothing and the current cursor
# The host phases a StepRecord holds: name -> field (seconds).
PHASE_FIELDS = {"schedule": "schedule_s", "message": "message_s", "execute": "execute_s",
                "process": "process_s", "lock": "lock_s"}


@dataclass(frozen=True, slots=True)
class ThreadUsage:
    """The calling thread's CPU seconds and context switches (Linux `RUSAGE_THREAD`; zeros elsewhere)."""

    cpu_s: float = 0.0
    voluntary_switches: int = 0
    involuntary_switches: int = 0

    @classmethod
    def now(cls) -> ThreadUsage:
        if _RUSAGE_THREAD is None:
            return cls()
        ru = resource.getrusage(_RUSAGE_THREAD)
        return cls(ru.ru_utime + ru.ru_stime, ru.ru_nvcsw, ru.ru_nivcsw)

    def __sub__(self, other: ThreadUsage) -> ThreadUsage:
        return ThreadUsage(self.cpu_s - other.cpu_s, self.voluntary_switches - other.voluntary_switches,
                           self.involuntary_switches - other.involuntary_switches)

    def __add__(self, other: ThreadUsage) -> ThreadUsage:
        return ThreadUsage(self.cpu_s + other.cpu_s, self.voluntary_switches + other.voluntary_switches,
                           self.involuntary_switches + other.involuntary_switches)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step.

    `start`/`end`: the step's work (schedule -> outputs delivered), monotonic s.
    `idle_s`: how long the step loop waited for work just before `start`.
    `lock_s`: waits for the engine lock (callers adding or aborting requests).
    Phases (s): `schedule_s` (the scheduler), `message_s` (building the ranks'
    step message), `execute_s` (the runner step as the host sees it: with TP the
    executor round trip; it ends after the sampled ids reached the host, so it
    holds the GPU time), `process_s` (commit, stop checks, output delivery).
    Rows: `decode_rows` (one generated token each), `prefill_rows` and
    `prefill_tokens` (prompt chunks, or recomputation after a preemption);
    `outputs`: deltas handed to request streams; `waiting`: queued requests after
    scheduling. `usage`: the step loop thread's own CPU time and context switches
    over the step's phases (`ThreadUsage`): a step whose wall time far exceeds its
    CPU time waited, and voluntary switches count the waits (the GIL, a lock, the
    GPU), involuntary ones the times the OS took the core away. Under async scheduling (`engine/overlap.py`) a step starts while the
    one before it is still unread, so a record overlaps its neighbours (never more);
    its phases are still its own (the step loop's host time on this step, disjoint
    from every other record's), and `own_s` gives each record the loop's time spent
    on it alone: consecutive records' `own_s` tile the loop's time, one step per TPOT.
    """

    start: float
    end: float
    idle_s: float
    lock_s: float
    schedule_s: float
    message_s: float
    execute_s: float
    process_s: float
    decode_rows: int
    prefill_rows: int
    prefill_tokens: int
    outputs: int
    waiting: int
    usage: ThreadUsage = ThreadUsage()

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def own_s(self, prev_end: float) -> float:
        """This step's share of the loop's wall time: from the later of its start and the previous
        record's end (`prev_end`) to its end; `duration_s` when steps do not overlap."""
        return self.end - max(self.start, prev_end)


@dataclass(frozen=True, slots=True)
class EncodeRecord:
    """One vision tower call: `start`/`end` monotonic s, `images` (videos count once), `patches` (tower rows)."""

    start: float
    end: float
    images: int
    patches: int


@dataclass(frozen=True, slots=True)
class TimelineRead(Generic[R]):
    """Records `[cursor - len(records), cursor)` in order; pass `cursor` to the next read.

    `dropped`: records after the requested cursor that were overwritten before this read.
    """

    records: tuple[R, ...]
    cursor: int
    dropped: int


class Timeline(Generic[R]):
    """A ring buffer of the last `capacity` records; record `i` is the i-th ever appended.

    One writer thread and any number of readers: a lock (uncontended: tens of ns)
    keeps a read from seeing a slot half-way through being replaced.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError("timeline capacity must be >= 1")
        self.capacity = capacity
        self._slots: list[R | None] = [None] * capacity
        self._count = 0
        self._lock = threading.Lock()

    def append(self, record: R) -> None:
        with self._lock:
            self._slots[self._count % self.capacity] = record
            self._count += 1

    def read(self, since: int = 0) -> TimelineRead[R]:
        """Records appended at or after cursor `since` that are still held.

        A cursor past the end reads nothing and returns the current cursor (a mark).
        """
        with self._lock:
            count = self._count
            first = max(since, count - self.capacity, 0)
            records = tuple(self._slots[i % self.capacity] for i in range(first, count))
        return TimelineRead(records, count, max(first - max(since, 0), 0))  # type: ignore[arg-type]


def count_rows(scheduled: Iterable[ScheduledSeq]) -> tuple[int, int, int]:
    """(decode rows, prefill rows, prefill tokens) of one step's scheduled sequences.

    A decode row computes one generated token (what the runner's decode fast path
    takes); everything else (prompt chunks, recomputation after a preemption) is prefill.
    """
    decode = prefill = tokens = 0
    for item in scheduled:
        n = item.num_new_tokens
        if n == 1 and item.start >= item.seq.num_prompt_tokens:
            decode += 1
        else:
            prefill += 1
            tokens += n
    return decode, prefill, tokens
