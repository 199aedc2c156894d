"""`EngineProcess`: the `Engine` API of a replica, with the engine itself in a spawned process.

Served, an in-process engine's step thread shares the replica's GIL with everything else
the replica does per token (Ray Serve's streaming, the colocated ingress' detokenize and
SSE writes): its steps then wait for the GIL. Here the engine runs in a process of its own
(its own GIL, its own busy step loop) and this front end keeps only what a caller needs at
once: validation (the same `validate_request`, so a bad request raises here and nothing is
queued), the request streams, and one reader thread, blocked on the pipe (a blocking recv
releases the GIL), that hands each step's deltas to the streams with `put_many`: one
wake-up per event loop per step, as in process.

The front end never touches CUDA: the child inherits the replica's CUDA_VISIBLE_DEVICES,
embeddings on the host reach it through shared memory (`SharedInputs`), and inputs only
the child can open (`DeferredInputs`, e.g. CUDA IPC handles) are opened there by the
`open_inputs` callable given at start-up, or, when the `InputEncoder` given at start-up accepts
them, encoded there by its own model on the engine's device (a vision tower beside the engine:
`engine/core/encoding.py`); its calls come back as `Encoded` records (`encode_timeline`). With
TP 1 the child runs the model itself; with TP > 1 it joins this process' Ray cluster
(`RayLink`: GCS address, namespace, runtime env and this replica's placement group) and drives
the TP worker actors, which it owns: they die with it. Steps, scheduling and output streaming then all leave this process' GIL.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import threading
import types
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch.multiprocessing as torch_mp  # registers the tensor reductions (shared memory) with the pipe's pickler

from engine.config import EngineConfig
from engine.core import child
from engine.core.encoding import InputEncoder
from engine.core.messages import (
    Abort, Add, DeferredInputs, Died, Encoded, Failed, NewRequest, Query, Ready, Reply, SharedInputs, StepOutputs,
    Stop,
)
from engine.core.ray_link import RayLink
from engine.errors import EngineDeadError, EngineInputError
from engine.log_setup import configured_level
from engine.sampling_params import SamplingParams
from engine.sequence import MultimodalInputs, RequestOutput
from engine.stream import RequestStream, put_many
from engine.timeline import EncodeRecord, StepRecord, Timeline, TimelineRead
from engine.validation import validate_request
from models.config import ModelConfig, load_model_config

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 60.0  # a query the engine process does not answer in this time marks it dead
STOP_TIMEOUT_S = 30.0  # shutdown waits this long for the process to exit, then kills it


class EngineProcess:
    """Drop-in for `engine.Engine` with the engine in its own process.

    Args:
        config: the engine's config.
        open_inputs: turns a `DeferredInputs` into `MultimodalInputs` in the engine process
            (picklable; called there). None: only `MultimodalInputs` are accepted.
        ray_link: TP > 1 only: the Ray cluster and placement group the engine process uses;
            None: this process' (`RayLink.current()`, which connects to Ray if needed).
        encoder: TP 1 only: encodes the `DeferredInputs` it accepts in the engine process, with a
            model of its own on the engine's device (picklable; loaded there before `Ready`).
    Raises:
        ValueError: a `ray_link` with tensor_parallel_size 1 (TP 1 never connects to Ray), or an
            `encoder` with tensor_parallel_size > 1 (the engine process then holds no GPU).
        Exception: whatever the engine raised while starting in its process (bad checkpoint,
            out of memory, no resources for the TP workers), with its message.
    """

    config_class = EngineConfig

    def __init__(self, config: EngineConfig, open_inputs: Callable[[Any], MultimodalInputs] | None = None,
                 ray_link: RayLink | None = None, encoder: InputEncoder | None = None):
        if config.tensor_parallel_size == 1 and ray_link is not None:
            raise ValueError("a TP 1 engine process runs the model itself: it takes no Ray link")
        if config.tensor_parallel_size > 1 and encoder is not None:
            raise ValueError("an input encoder runs beside a TP 1 engine only: a TP engine process holds no GPU")
        if config.tensor_parallel_size > 1 and ray_link is None:
            ray_link = RayLink.current()
        self.config = config
        self.model_config: ModelConfig = load_model_config(config.model)
        self.max_model_len = config.max_model_len or self.model_config.text.max_position_embeddings
        self._takes_deferred = open_inputs is not None or encoder is not None
        self._encodes: Timeline[EncodeRecord] = Timeline()  # the encoder's calls, as the child reports them
        self._lock = threading.Lock()  # streams and failure state: callers vs the reader thread
        self._send_lock = threading.Lock()
        self._open: dict[str, tuple[RequestStream, int]] = {}  # request id -> (stream, prompt tokens)
        self._discard: Counter[str] = Counter()  # aborted here: the engine's outputs up to its final are dropped
        self._queries: dict[int, Future] = {}
        self._query_ids = itertools.count()
        self._dead: str | None = None
        self._closed = False
        self._last_stats: dict[str, Any] = {}
        self._latest_stats: dict[str, Any] = {}  # the last snapshot the step messages carried
        ctx = torch_mp.get_context("spawn")  # never fork a process holding CUDA or Ray state
        self._conn, theirs = ctx.Pipe()
        self._process = ctx.Process(target=child.run, name="splitvl-engine", daemon=True,
                                    args=(config, theirs, open_inputs, sys.getswitchinterval(), ray_link, encoder,
                                          configured_level()))
        with _main_not_reimported():
            self._process.start()
        theirs.close()  # the child's death then closes the pipe for the reader
        try:
            ready = self._wait_ready()
        except BaseException:
            self._conn.close()
            raise
        self.num_blocks = ready.num_blocks
        self.worker_ids = ready.worker_ids  # the TP worker actors (hex ids), for diagnostics
        self._reader = threading.Thread(target=self._read_loop, name="splitvl-engine-reader", daemon=True)
        self._reader.start()

    # ---- the Engine API ---------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], mm_inputs: Any,
                    sampling: SamplingParams) -> RequestStream:
        """As `Engine.add_request`; `mm_inputs` may also be a `DeferredInputs`."""
        return self.add_requests([(request_id, prompt_token_ids, mm_inputs, sampling)])[0]

    def add_requests(self, requests: list[tuple[str, list[int], Any, SamplingParams]]) -> list[RequestStream]:
        """As `Engine.add_requests`: validated here, all or none queued, errors raised at once."""
        self._check_alive()
        kv_tokens = self.num_blocks * self.config.block_size
        batch = []
        for request_id, ids, mm, sampling in requests:
            checked = validate_request(self.model_config, self.max_model_len, kv_tokens, ids,
                                       self._for_validation(mm), sampling, hash_images=False)  # the child keys them
            wire = SharedInputs.of(mm) if isinstance(mm, MultimodalInputs) else mm
            batch.append(NewRequest(request_id, checked.prompt_token_ids, wire, sampling))
        with self._lock:
            self._check_alive()
            seen: set[str] = set()
            for req in batch:
                if req.request_id in self._open or req.request_id in seen:
                    raise EngineInputError(f"request id {req.request_id!r} is already running", param="request_id")
                seen.add(req.request_id)
            streams = [RequestStream(req.request_id, self.abort) for req in batch]
            for req, stream in zip(batch, streams):
                self._open[req.request_id] = (stream, len(req.prompt_token_ids))
        self._send(Add(tuple(batch)))
        return streams

    def abort(self, request_id: str) -> None:
        """End a request now: its stream ends with "abort" here; the engine frees it on receipt."""
        with self._lock:
            entry = self._open.pop(request_id, None)
            if entry is None:
                return
            self._discard[request_id] += 1
        stream, prompt_tokens = entry
        stream.put(RequestOutput(request_id, [], "abort", None, prompt_tokens))
        self._send(Abort(request_id))

    @property
    def executor_device(self) -> str:
        return self.config.device

    @property
    def pid(self) -> int | None:
        """The engine process' id."""
        return self._process.pid

    def is_healthy(self) -> bool:
        if self._dead is None and not self._closed and not self._process.is_alive():
            self._fail(f"the engine process exited (exit code {self._process.exitcode})")
        return self._dead is None and not self._closed

    def stats(self) -> dict[str, Any]:
        """As `Engine.stats`; once the engine is down, its last answer with healthy False."""
        if self._dead is None and not self._closed:
            try:
                self._last_stats = self._query("stats")
            except EngineDeadError:
                pass
        return {**self._last_stats, "healthy": self._dead is None and not self._closed}

    def latest_stats(self) -> dict[str, Any]:
        """The engine's stats as of its last snapshot, without asking it (for metrics).

        The engine process attaches one to its step messages at most every ~50 ms and
        whenever it runs out of requests, so once it is idle this equals `stats()`.
        """
        return {**self._latest_stats, "healthy": self._dead is None and not self._closed}

    def timeline(self, since: int = 0) -> TimelineRead[StepRecord]:
        """The engine process' step records from cursor `since` on (none once it is down)."""
        try:
            return self._query("timeline", since)
        except EngineDeadError:
            return TimelineRead((), since, 0)

    def encode_timeline(self, since: int = 0) -> TimelineRead[EncodeRecord]:
        """The input encoder's calls in the engine process from cursor `since` on (none without one)."""
        return self._encodes.read(since)

    def shutdown(self) -> None:
        """Abort every stream, stop the engine process and wait for it (bounded, then killed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ending, self._open = self._open, {}
        put_many([(s, RequestOutput(rid, [], "abort", None, n)) for rid, (s, n) in ending.items()])
        self._send(Stop(), quiet=True)
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the engine process did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join(STOP_TIMEOUT_S)
        self._reader.join(STOP_TIMEOUT_S)
        self._conn.close()

    # ---- internals --------------------------------------------------------------------

    def _wait_ready(self) -> Ready:
        while not self._conn.poll(0.5):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited while starting (exit code {self._process.exitcode})")
        try:
            msg = self._conn.recv()
        except EOFError:
            msg = None
        if isinstance(msg, Ready):
            return msg
        self._process.join(STOP_TIMEOUT_S)
        if isinstance(msg, Failed):
            log.error("the engine process failed to start:\n%s", msg.traceback)
            raise msg.error
        raise RuntimeError(f"the engine process exited while starting (exit code {self._process.exitcode})")

    def _for_validation(self, mm: Any) -> MultimodalInputs | None:
        if mm is None or isinstance(mm, MultimodalInputs):
            return mm
        if self._takes_deferred and isinstance(mm, DeferredInputs):
            return mm.placeholder()
        raise EngineInputError(f"multimodal inputs must be MultimodalInputs, got {type(mm).__name__}",
                               param="images")

    def _check_alive(self) -> None:
        if self._dead is not None or self._closed:
            raise EngineDeadError(self._dead or "the engine is shut down")

    def _send(self, msg: Any, quiet: bool = False) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as exc:  # the process is gone (broken pipe) or the pipe closed
            if not quiet:
                self._fail(f"the engine process is gone ({type(exc).__name__})")

    def _query(self, name: str, *args: Any) -> Any:
        future: Future = Future()
        with self._lock:
            self._check_alive()
            query_id = next(self._query_ids)
            self._queries[query_id] = future
        self._send(Query(query_id, name, args))
        try:
            return future.result(QUERY_TIMEOUT_S)
        except FutureTimeout:
            self._fail(f"the engine process did not answer {name!r} within {QUERY_TIMEOUT_S:.0f} s")
            raise EngineDeadError(self._dead or "the engine is shut down") from None
        finally:
            with self._lock:
                self._queries.pop(query_id, None)

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                code = self._process.exitcode if not self._process.is_alive() else None
                self._fail(f"the engine process exited (exit code {code})")
                return
            if isinstance(msg, StepOutputs):
                if msg.stats is not None:  # before the outputs: a caller woken by a final sees it
                    self._latest_stats = msg.stats
                self._deliver(msg.outputs())
            elif isinstance(msg, Reply):
                with self._lock:
                    future = self._queries.get(msg.query_id)
                if future is not None and not future.done():
                    future.set_result(msg.value)
            elif isinstance(msg, Encoded):
                self._encodes.append(msg.record)
            elif isinstance(msg, Died):
                self._fail(msg.message)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One step's deltas to their streams, in one `put_many`."""
        items = []
        with self._lock:
            for out in outputs:
                rid = out.request_id
                if rid in self._discard:  # aborted here; every output the engine sent before its final
                    if out.finished:
                        self._discard[rid] -= 1
                        if not self._discard[rid]:
                            del self._discard[rid]
                    continue
                entry = self._open.pop(rid, None) if out.finished else self._open.get(rid)
                if entry is not None:
                    items.append((entry[0], out))
        put_many(items)

    def _fail(self, message: str) -> None:
        """Mark the engine dead and end every open stream with an error (as a dead TP worker does)."""
        with self._lock:
            if self._dead is not None or self._closed:
                return
            self._dead = message
            ending, self._open = self._open, {}
            self._discard.clear()
            queries = list(self._queries.values())
        log.error("engine is unhealthy: %s", message)
        put_many([(s, RequestOutput(rid, [], "error", None, n, 0, message)) for rid, (s, n) in ending.items()])
        for future in queries:
            if not future.done():
                future.set_exception(EngineDeadError(message))


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Spawn without re-running this process' `__main__` in the child.

    spawn imports the parent's main module in the child (for objects pickled from it); the
    engine process needs nothing from it, and the host's main (a Ray worker's entry point, a
    script without a `__main__` guard) must not run twice. spawn skips that import for a main
    module with neither `__spec__` nor `__file__`.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
