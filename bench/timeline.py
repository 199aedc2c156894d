"""The LLM replica's step timeline under load: pulled per level by bench/serve.py, summarized, printed.

The engine records one `StepRecord` per step and the vision replica one
`EncodeRecord` per tower call (engine/timeline.py); `TimelineSource` reads both
through the deployment handles since a mark taken before the level, and
`summarize` reduces a level's records to the columns `print_timeline` prints:

- steps/s over the level's step window (first step start -> last step end);
- mean decode rows and prefill tokens per step, outputs (deltas) per step;
- host phases per step in ms (mean, p50, p99): the whole step (its own wall time:
  under async scheduling from the previous step's end, `own_times_s`), schedule, message
  (the ranks' step message), execute (the runner step with its GPU time as the
  host sees it; with TP the executor round trip), process (commit, stops, output
  delivery), lock (waits for the engine lock);
- idle %: the share of the window the step loop waited for work; how many of
  those waits were gaps over 5 ms and the longest (one long gap per level is a
  closed-loop wave draining before the next one's prompts arrive);
- vision %: the share of the window with a vision tower call running (same node:
  both replicas' clocks are the node's CLOCK_MONOTONIC);
- mixed steps (a prefill chunk together with decodes), how many of them launched before the
  step ahead was read (async scheduling), and their mean ms against pure-decode steps, and
  pure-decode steps with / without a tower call overlapping.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from bench.common import print_table
from bench.load import percentile
from engine.timeline import MARK, PHASE_FIELDS, EncodeRecord, StepRecord, ThreadUsage

PHASES = ("step", *PHASE_FIELDS)
IDLE_GAP_S = 0.005  # an idle wait longer than this counts as a gap in the table


class TimelineSource:
    """The LLMServer's step records and the VisionEncoder's tower calls of one Serve app.

    With several replicas of a deployment a handle call reaches one of them:
    the layouts benchmarked here run one of each.
    """

    def __init__(self, llm: Any, vision: Any | None, vision_method: str = "timeline"):
        """`vision`: the handle whose `vision_method` returns the tower's calls (a `TimelineRead`, or None
        where that replica has no tower)."""
        self.llm, self.vision, self.vision_method = llm, vision, vision_method
        self.cursors = (0, 0)

    @classmethod
    def for_app(cls, app_name: str) -> TimelineSource:
        from ray import serve

        from deployments.app import engine_deployment

        names = serve.status().applications[app_name].deployments
        llm = serve.get_deployment_handle(engine_deployment(app_name), app_name)
        if "VisionEncoder" in names:
            return cls(llm, serve.get_deployment_handle("VisionEncoder", app_name))
        # No vision deployment: a colocated ingress may run the tower itself (vision.colocate_llm).
        return cls(llm, llm, "vision_timeline") if "OpenAIIngress" in names and "LLMServer" not in names else cls(llm, None)

    async def _read(self, since: tuple[int, int]) -> tuple[Any, Any | None]:
        steps = await self.llm.timeline.remote(since[0])
        encodes = None
        if self.vision is not None:
            encodes = await getattr(self.vision, self.vision_method).remote(since[1])
        return steps, encodes

    async def mark(self) -> None:
        """Records from now on belong to the next `pull`."""
        steps, encodes = await self._read((MARK, MARK))
        self.cursors = (steps.cursor, encodes.cursor if encodes is not None else 0)

    async def pull(self) -> dict:
        """The records since the mark: summary, raw records (as dicts) and how many were lost."""
        steps, encodes = await self._read(self.cursors)
        enc = encodes.records if encodes is not None else ()
        self.cursors = (steps.cursor, encodes.cursor if encodes is not None else 0)
        return {"summary": summarize(steps.records, enc),
                "dropped_steps": steps.dropped, "dropped_encodes": encodes.dropped if encodes is not None else 0,
                "steps": [dataclasses.asdict(r) for r in steps.records],
                "encodes": [dataclasses.asdict(r) for r in enc]}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _overlaps(merged: list[tuple[float, float]], starts: list[float], lo: float, hi: float) -> bool:
    """Whether [lo, hi] meets any of the disjoint sorted intervals `merged` (`starts`: their starts)."""
    i = bisect.bisect_left(starts, hi)  # intervals starting before hi
    return i > 0 and merged[i - 1][1] > lo


def _ms_stats(values_s: Sequence[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    return {"mean": sum(ms) / len(ms) if ms else math.nan, "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


def _mean_ms(values_s: Sequence[float]) -> float:
    return 1e3 * sum(values_s) / len(values_s) if values_s else math.nan


def own_times_s(steps: Sequence[StepRecord]) -> list[float]:
    """Each step's own wall time (`StepRecord.own_s` against the records before it): under async
    scheduling a record spans its launch to its outputs, over the next step's launch; these don't overlap."""
    out, prev_end = [], -math.inf
    for s in steps:
        out.append(s.own_s(prev_end))
        prev_end = max(prev_end, s.end)
    return out


def _usage(pairs: Sequence[tuple[StepRecord, float]]) -> dict[str, float]:
    """Mean own wall ms, loop-thread CPU ms and context switches per step of (record, own time) pairs."""
    n = len(pairs) or math.nan  # no steps: every mean is nan
    usage = sum((s.usage for s, _ in pairs), ThreadUsage())
    return {"steps": len(pairs), "wall_ms": 1e3 * sum(t for _, t in pairs) / n, "cpu_ms": 1e3 * usage.cpu_s / n,
            "voluntary_switches": usage.voluntary_switches / n, "involuntary_switches": usage.involuntary_switches / n}


def summarize(steps: Sequence[StepRecord], encodes: Sequence[EncodeRecord]) -> dict:
    """One level's timeline in numbers (ms, fractions of the step window)."""
    if not steps:
        return {"steps": 0}
    lo, hi = steps[0].start, steps[-1].end
    span = max(hi - lo, 1e-9)
    n = len(steps)
    merged = _union([(max(e.start, lo), min(e.end, hi)) for e in encodes if e.end > lo and e.start < hi])
    starts = [m[0] for m in merged]
    own = own_times_s(steps)
    kinds = {"decode": [(s, t) for s, t in zip(steps, own) if s.prefill_rows == 0],
             "prefill": [(s, t) for s, t in zip(steps, own) if s.prefill_rows and not s.decode_rows],
             "mixed": [(s, t) for s, t in zip(steps, own) if s.prefill_rows and s.decode_rows]}
    decode_only = [t for _, t in kinds["decode"]]
    mixed = [t for _, t in kinds["mixed"]]
    with_encode, without_encode = [], []
    for s, t in kinds["decode"]:
        (with_encode if _overlaps(merged, starts, s.end - t, s.end) else without_encode).append(t)
    phases = {"step": own,
              **{name: [getattr(s, field) for s in steps] for name, field in PHASE_FIELDS.items()}}
    return {
        "steps": n,
        "window_s": span,
        "steps_per_s": n / span,
        "decode_rows_mean": sum(s.decode_rows for s in steps) / n,
        "prefill_tokens_per_step": sum(s.prefill_tokens for s in steps) / n,
        "outputs_per_step": sum(s.outputs for s in steps) / n,
        "phases_ms": {k: _ms_stats(v) for k, v in phases.items()},
        "busy_frac": sum(own) / span,
        # One long gap (a closed-loop wave ending before the next one's prompts arrive) or
        # many short ones (requests trickling in slower than the engine drains them).
        "idle_gaps": sum(1 for s in steps[1:] if s.idle_s > IDLE_GAP_S),
        "idle_gap_max_ms": 1e3 * max((s.idle_s for s in steps[1:]), default=0.0),
        "idle_frac": sum(s.idle_s for s in steps[1:]) / span,  # the first step's wait is before the window
        "vision_overlap_frac": sum(b - a for a, b in merged) / span,
        "mixed_steps": len(mixed),
        "mixed_step_ms": _mean_ms(mixed),
        # Launched before the step ahead was read (async scheduling): its record starts before that one ends.
        "mixed_early": sum(1 for prev, s in zip(steps, steps[1:]) if s.prefill_rows and s.decode_rows
                           and s.start < prev.end),
        "decode_steps": len(decode_only),
        "decode_step_ms": _mean_ms(decode_only),
        "decode_step_ms_with_encode": _mean_ms(with_encode),
        "decode_step_ms_without_encode": _mean_ms(without_encode),
        "encodes": len(encodes),
        "encode_images": sum(e.images for e in encodes),
        "encode_ms_mean": 1e3 * sum(e.end - e.start for e in encodes) / len(encodes) if encodes else math.nan,
        # Wall against the loop thread's CPU time and context switches, per kind of step: a step
        # much longer than its CPU time waited (GIL, GPU, lock); involuntary switches: the OS preempted it.
        "thread_usage": {kind: _usage(pairs) for kind, pairs in kinds.items()},
    }


def print_timeline(runs: list[dict]) -> None:
    """Two tables over every level that has a timeline: the step mix, and the host phases."""
    levels = [(run["layout"], lv["concurrency"], lv["timeline"]) for run in runs for lv in run["levels"]
              if lv.get("timeline", {}).get("summary", {}).get("steps")]
    if not levels:
        return
    rows = []
    for layout, c, tl in levels:
        s = tl["summary"]
        rows.append([layout, c, s["steps"], s["steps_per_s"], s["decode_rows_mean"], s["prefill_tokens_per_step"],
                     s["outputs_per_step"], f"{100 * s['idle_frac']:.1f}%", s["idle_gaps"], s["idle_gap_max_ms"],
                     f"{100 * s['vision_overlap_frac']:.1f}%",
                     s["mixed_steps"], s.get("mixed_early", math.nan), s["mixed_step_ms"], s["decode_steps"],
                     s["decode_step_ms"],
                     s["decode_step_ms_with_encode"], s["decode_step_ms_without_encode"], s["encodes"],
                     s["encode_ms_mean"], tl["dropped_steps"]])
    print_table("LLM replica step timeline per level (bench/timeline.py; ms: each step's own wall time)",
                ["layout", "conc", "steps", "steps/s", "decode rows", "prefill tok/step", "outputs/step",
                 "idle", "idle gaps > 5 ms", "longest idle ms", "vision overlap", "mixed steps", "mixed launched early", "mixed ms", "decode steps", "decode ms",
                 "decode ms w/ encode", "decode ms w/o encode", "encodes", "encode ms", "dropped"], rows)
    rows = [[layout, c, kind, *(u[k] for k in ("steps", "wall_ms", "cpu_ms", "voluntary_switches", "involuntary_switches"))]
            for layout, c, tl in levels for kind, u in tl["summary"].get("thread_usage", {}).items() if u["steps"]]
    print_table("LLM replica step loop thread per kind of step (means: own wall ms, CPU ms, context switches)",
                ["layout", "conc", "steps", "count", "wall ms", "cpu ms", "voluntary switches", "involuntary switches"],
                rows)
    rows = [[layout, c, phase, *(tl["summary"]["phases_ms"][phase][k] for k in ("mean", "p50", "p99"))]
            for layout, c, tl in levels for phase in PHASES]
    print_table("LLM replica host time per step by phase (ms)",
                ["layout", "conc", "phase", "mean", "p50", "p99"], rows)
