"""The engine process' encoder thread: requests whose inputs need model work before they can be queued.

A `DeferredInputs` that the `InputEncoder` given to `EngineProcess` accepts (e.g. a request's
images for a vision tower in the engine process, `deployments/pixel_inputs.py`) is not
opened on the main thread, which must keep reading the pipe (aborts, other requests,
queries) while the tower runs. Its request waits here instead: one thread takes the requests
queued meanwhile (up to the encoder's `max_batch_size` items; a larger request goes alone),
encodes them in one call and adds those still wanted to the engine, in arrival order. A
request aborted while it waits or is encoded is never added: its final "abort" is sent from
here. A failed encode ends that batch's requests with "error"; the next batch runs as usual.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from engine.core.messages import Encoded, NewRequest, StepOutputs, final_output
from engine.sequence import MultimodalInputs
from engine.timeline import EncodeRecord

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # how long stopping waits for an encode in progress


@runtime_checkable
class InputEncoder(Protocol):
    """Turns accepted `DeferredInputs` into `MultimodalInputs` with a model of its own, in the engine
    process. Picklable; `load` runs there once, before the engine process reports ready."""

    max_batch_size: int

    def load(self) -> None: ...

    def accepts(self, mm: Any) -> bool: ...

    def count(self, mm: Any) -> int:
        """The items (images) of `mm`: what `max_batch_size` bounds."""
        ...

    def encode(self, batch: list[Any]) -> tuple[list[MultimodalInputs], EncodeRecord | None]:
        """One `MultimodalInputs` per entry, finished on the device, and the model call's record
        (None when no call was needed)."""
        ...


class EncodeWorker:
    """The encoder thread of one engine process.

    Args:
        encoder: the loaded `InputEncoder`.
        add: queues encoded requests in the engine (called with this worker's lock held, so an abort
            that misses the request here finds it in the engine).
        send: sends a message to the front end (`StepOutputs` of aborted or failed requests, `Encoded`).
    """

    def __init__(self, encoder: InputEncoder, add: Callable[[list[tuple[NewRequest, MultimodalInputs]]], None],
                 send: Callable[[Any], None]):
        self.encoder, self._add, self._send = encoder, add, send
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: deque[NewRequest] = deque()
        self._wanted: dict[str, NewRequest] = {}  # waiting or being encoded, and not aborted
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="splitvl-encoder", daemon=True)
        self._thread.start()

    def submit(self, requests: list[NewRequest]) -> None:
        with self._lock:
            self._queue.extend(requests)
            self._wanted.update((r.request_id, r) for r in requests)
            self._arrived.notify()

    def abort(self, request_id: str) -> bool:
        """Drop a request that waits or is being encoded; False: it is not here (the engine has it, or it ended)."""
        with self._lock:
            req = self._wanted.pop(request_id, None)
        if req is None:
            return False
        self._send(StepOutputs.of([final_output(req, "abort")]))
        return True

    def stop(self) -> None:
        """Stop taking batches; the requests still waiting are dropped (the front end ended their streams)."""
        with self._lock:
            self._stopped = True
            self._arrived.notify()
        self._thread.join(STOP_TIMEOUT_S)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopped:
                    self._arrived.wait()
                if self._stopped:
                    return
                batch = self._take()
            if batch:
                self._run(batch)

    def _take(self) -> list[NewRequest]:
        """The next batch, in arrival order (called with the lock held); aborted requests are skipped."""
        batch: list[NewRequest] = []
        items = 0
        while self._queue:
            req = self._queue[0]
            if self._wanted.get(req.request_id) is not req:
                self._queue.popleft()
                continue
            count = self.encoder.count(req.mm)
            if batch and items + count > self.encoder.max_batch_size:
                break
            batch.append(self._queue.popleft())
            items += count
        return batch

    def _run(self, batch: list[NewRequest]) -> None:
        try:
            inputs, record = self.encoder.encode([r.mm for r in batch])
            if len(inputs) != len(batch):
                raise RuntimeError(f"the encoder returned {len(inputs)} inputs for {len(batch)} requests")
        except Exception as exc:  # out of memory, a bad image: these requests fail, the next batch runs
            log.exception("encoding %d request(s) failed", len(batch))
            self._finish(batch, None, f"{type(exc).__name__}: {exc}")
            return
        if record is not None:
            self._send(Encoded(record))
        self._finish(batch, inputs, None)

    def _finish(self, batch: list[NewRequest], inputs: list[MultimodalInputs] | None, error: str | None) -> None:
        """Queue (or fail) the batch's requests that are still wanted."""
        with self._lock:
            live = [(req, mm) for req, mm in zip(batch, inputs or [None] * len(batch), strict=True)
                    if self._wanted.get(req.request_id) is req]
            for req, _ in live:
                del self._wanted[req.request_id]
            if error is None and live:
                self._add(live)
        if error is not None and live:
            self._send(StepOutputs.of([final_output(req, "error", error) for req, _ in live]))

