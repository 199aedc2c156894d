"""The engine process: a real `Engine` whose step outputs go to the front end, one message per step.

Its main thread reads the pipe (requests, aborts, queries, stop); the engine's own step
thread runs the steps and sends each step's deltas; with an `InputEncoder` (a vision tower
in this process) an encoder thread encodes the requests it accepts before they are queued
(`engine/core/encoding.py`). All send through one lock. The pipe
closing (the front end's process died) ends the process too. With TP > 1 it first joins
the replica's Ray cluster (`RayLink`) and drives the TP worker actors from here; TP 1
never touches Ray.
"""

from __future__ import annotations

import logging
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from engine.config import EngineConfig
from engine.core.encoding import EncodeWorker, InputEncoder
from engine.core.messages import (
    Abort, Add, Died, Failed, NewRequest, Query, Ready, Reply, SharedInputs, StepOutputs, Stop, final_output,
)
from engine.core.ray_link import RayLink
from engine.engine import Engine
from engine.log_setup import configure_logging
from engine.sequence import MultimodalInputs, RequestOutput

log = logging.getLogger(__name__)

QUERIES = ("stats", "timeline")
HEALTH_EVERY_S = 1.0  # an idle engine checks its executor this often (a TP worker may die between steps)
STATS_EVERY_S = 0.05  # how stale the stats snapshot on the step messages may get while requests run


class _Sender:
    """The child's end of the pipe, shared by the main thread (replies) and the step thread (outputs)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, msg: Any) -> None:
        with self._lock:
            try:
                self.conn.send(msg)
            except OSError:  # the front end is gone; the main thread's recv ends the process
                pass


class ChildEngine(Engine):
    """An `Engine` whose streams are the front end's: deltas are sent, not queued here."""

    def __init__(self, config: EngineConfig, sender: _Sender, link: RayLink | None):
        self._sender = sender
        self._stats_at = 0.0  # monotonic time of the last stats snapshot sent
        if link is not None:
            link.connect()
        super().__init__(config, placement_group=link.placement_group if link is not None else None)

    def _open_stream(self, request_id: str) -> Any:
        return request_id  # a marker: the stream itself lives in the front end

    def _deliver(self, outbox: list[tuple[Any, RequestOutput]]) -> None:
        """Called under the engine's lock, after the step's finished requests freed their blocks."""
        if outbox:
            self._sender.send(StepOutputs.of((out for _, out in outbox), self._stats_due()))

    def _stats_due(self) -> dict[str, Any] | None:
        """A stats snapshot every `STATS_EVERY_S`, and always once the engine is idle (the final values)."""
        now = time.monotonic()
        if self._seqs and now - self._stats_at < STATS_EVERY_S:
            return None
        self._stats_at = now
        return self.stats()

    def _fail(self, message: str) -> None:
        dead = self._dead is not None
        super()._fail(message)
        if not dead:
            self._sender.send(Died(message))


def run(config: EngineConfig, conn: Connection, open_inputs: Callable[[Any], MultimodalInputs] | None,
        switch_interval_s: float, link: RayLink | None = None, encoder: InputEncoder | None = None,
        log_level: str | None = None) -> None:
    """The engine process' entry point (spawned by `EngineProcess`); `link`: given for TP > 1;
    `encoder`: loaded here after the engine (its model on the engine's device); `log_level`: the
    parent's `engine.log_setup` level, where it configured one."""
    sys.setswitchinterval(switch_interval_s)
    if log_level is not None:
        configure_logging(log_level)
    sender = _Sender(conn)
    engine = None
    try:
        engine = ChildEngine(config, sender, link)
        if encoder is not None:
            encoder.load()
    except BaseException as exc:  # bad checkpoint, out of memory, no resources, a worker died
        sender.send(Failed(_picklable(exc), traceback.format_exc()))
        if engine is not None:
            engine.shutdown()
        return
    workers = getattr(engine.executor, "workers", ())
    sender.send(Ready(engine.executor.num_blocks, tuple(w._actor_id.hex() for w in workers)))
    worker = EncodeWorker(encoder, partial(_queue, engine, sender), sender.send) if encoder is not None else None
    try:
        _serve(engine, conn, sender, open_inputs, worker)
    finally:
        if worker is not None:
            worker.stop()
        engine.shutdown()


def _serve(engine: ChildEngine, conn: Connection, sender: _Sender,
           open_inputs: Callable[[Any], MultimodalInputs] | None, worker: EncodeWorker | None = None) -> None:
    while True:
        try:
            if not conn.poll(HEALTH_EVERY_S):
                engine.is_healthy()  # a dead TP worker fails the engine: `Died` tells the front end
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the front end is gone
        if isinstance(msg, Add):
            _add(engine, sender, msg.requests, open_inputs, worker)
        elif isinstance(msg, Abort):
            if worker is None or not worker.abort(msg.request_id):  # not waiting for its encode
                engine.abort(msg.request_id)
        elif isinstance(msg, Query):
            value = getattr(engine, msg.name)(*msg.args) if msg.name in QUERIES else None
            sender.send(Reply(msg.query_id, value))
        elif isinstance(msg, Stop):
            return


def _add(engine: ChildEngine, sender: _Sender, requests: tuple[NewRequest, ...],
         open_inputs: Callable[[Any], MultimodalInputs] | None, worker: EncodeWorker | None = None) -> None:
    """Queue requests the front end validated; one whose inputs cannot be opened ends with "error".

    Those whose inputs the encoder accepts go to its thread, which queues them once encoded.
    """
    ready, failed, encode = [], [], []
    for req in requests:
        if worker is not None and worker.encoder.accepts(req.mm):
            encode.append(req)
            continue
        try:
            ready.append((req, _open(req.mm, open_inputs)))
        except Exception as exc:  # e.g. an IPC slot reused before it was read
            failed.append(final_output(req, "error", f"{type(exc).__name__}: {exc}"))
    if encode:
        worker.submit(encode)
    if failed:
        sender.send(StepOutputs.of(failed))
    _queue(engine, sender, ready)


def _queue(engine: ChildEngine, sender: _Sender, ready: list[tuple[NewRequest, MultimodalInputs | None]]) -> None:
    """`engine.add_requests`; if the engine refuses them (it died meanwhile), they end with "error"."""
    if not ready:
        return
    try:
        engine.add_requests([(req.request_id, req.prompt_token_ids, mm, req.sampling) for req, mm in ready])
    except Exception as exc:  # the engine died meanwhile, or it disagrees with the front end's checks
        sender.send(StepOutputs.of([final_output(req, "error", f"{type(exc).__name__}: {exc}") for req, _ in ready]))


def _open(mm: Any, open_inputs: Callable[[Any], MultimodalInputs] | None) -> MultimodalInputs | None:
    if mm is None or isinstance(mm, MultimodalInputs):
        return mm
    if isinstance(mm, SharedInputs):
        return mm.open()
    if open_inputs is None:
        raise TypeError(f"no opener for {type(mm).__name__} inputs was given to the engine process")
    return open_inputs(mm)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
