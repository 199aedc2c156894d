"""Launched steps (one rank, async scheduling): a step's sampled ids read after the next step is launched.

A plain-greedy step leaves its ids on the device and starts their copy to the
host; the runner keeps the tokens of launched steps itself (the engine sends
none back), so a decode row of the next step whose input token was sampled
by this step, not read yet, takes it from the device: the staged input id is
-(1 + j) for row j of that step's ids, replaced in place on the device after
the inputs are copied (into the CUDA graph's static buffer when one runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.seq_state import SeqState
from engine.step import StepMessage, StepResult


@dataclass(frozen=True, slots=True)
class LaunchedStep:
    """A step whose sampled ids may still be on their way to the host (`ModelRunner.launch`).

    Shapes: ids [N] int64 on the host (pinned on CUDA), valid once `ready` has
    passed; or `result` when the step read its tokens already (any sampling but
    plain greedy, or nothing sampled).
    """

    seq_ids: tuple[int, ...]
    number: int
    ids: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    result: StepResult | None = None


class StepLauncher:
    """`ModelRunner`'s launch / collect (a part of it, on its state: sequences, the last launch's ids)."""

    @torch.inference_mode()
    def launch(self, msg: StepMessage) -> LaunchedStep:
        """Run one step without waiting for a plain-greedy step's ids; `collect` reads them.

        The runner keeps the tokens of launched steps itself (the engine sends none
        back): a decode row whose input token is still on the device (sampled by the
        previous launch, not collected yet) reads it there, so the next step can be
        launched before this one's ids reached the host. Every other step samples
        on the host as `execute` does.
        """
        self._update(msg)
        number, self._launches = self._launches, self._launches + 1
        head = self._run(msg.steps) if msg.steps else None
        if head is None:
            return LaunchedStep((), number, result=StepResult((), (), ()))
        sampled = [s for s in msg.steps if s.sample]
        seq_ids = tuple(s.seq_id for s in sampled)
        states = [self.seqs[i] for i in seq_ids]
        if not all(st.plain_greedy for st in states):
            result = self._sample(msg.steps, head)
            self._keep(seq_ids, result.token_ids, number)
            return LaunchedStep(seq_ids, number, result=result)
        ids = head.greedy if head.greedy is not None else head.logits.argmax(dim=-1)
        self._last = (number, ids)
        for i, st in enumerate(states):
            st.pending = (number, i)
        host = self._host_ids[number % 2][: len(seq_ids)]  # the other one may be read meanwhile
        cuda = self.device.type == "cuda"
        host.copy_(ids, non_blocking=cuda)
        ready = torch.cuda.Event() if cuda else None
        if ready is not None:
            ready.record()
        return LaunchedStep(seq_ids, number, host, ready)

    def collect(self, step: LaunchedStep) -> StepResult:
        """The sampled tokens of a launched step (waits for its ids); steps are collected in launch order."""
        if step.result is not None:
            return step.result
        if step.ready is not None:
            step.ready.synchronize()
        ids = step.ids.tolist()
        self._keep(step.seq_ids, ids, step.number)
        return StepResult(step.seq_ids, tuple(ids), (None,) * len(ids))

    def _keep(self, seq_ids: tuple[int, ...], token_ids, number: int) -> None:
        for seq_id, token in zip(seq_ids, token_ids):
            st = self.seqs.get(seq_id)
            if st is None:
                continue  # freed meanwhile (finished one step early, or aborted)
            st.token_ids.append(token)
            if st.pending is not None and st.pending[0] == number:
                st.pending = None

    def _device_token(self, st: SeqState) -> int:
        """-(1 + j) for a token that is row j of the previous launch's ids (still on the device)."""
        if st.pending is None or self._last is None or st.pending[0] != self._last[0]:
            raise RuntimeError("a decode step's input token is neither on the host nor from the previous step")
        return -1 - st.pending[1]

    def _resolve(self, ids: torch.Tensor) -> None:
        """In place: entries -(1 + j) become row j of the previous launch's ids. Shapes: ids [B] int64."""
        prev = self._last[1]
        ids.copy_(torch.where(ids < 0, prev[(-1 - ids).clamp(min=0)], ids))
