"""The LLMServer deployment: one `engine.Engine` (a TP group) behind a streaming method.

With `llm.engine_process` the engine is an `engine.core.EngineProcess` (the same API, the
engine in a process of its own, which with TP > 1 drives the TP workers from there, in this
replica's placement group); this replica then opens no CUDA context: with TP 1, image
embeddings that arrive as CUDA IPC handles are forwarded to the engine process unread;
TP ranks take them through the object store, as without the engine process. With
`vision.colocate_llm` too (TP 1) the vision tower runs in the engine process: the router's
`ImagePixels` go there as one `PixelInputs` per request (`deployments/pixel_inputs.py`).

`generate` takes prompt ids (image placeholders already expanded), the engine's
`SamplingParams` and the ObjectRefs of the images' embeddings; it fetches those
straight from the encoder (a CUDA IPC slot or the object store; the router never
touched them), builds the
engine's `MultimodalInputs` and yields `TokenDelta`s. A cancelled call (client
gone, stop string hit, timeout) aborts the request in the engine.

`deployment_options` computes the replica's Serve options from config: one
placement-group bundle per TP rank, the replica's own CPUs merged into bundle 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from deployments.config import AppConfig, ensure_checkpoint, needs_vision, resolve_dtype
from deployments.errors import APIError, EncoderUnavailableError, InvalidRequestError, ServiceUnavailableError
from deployments.messages import TokenDelta
from deployments.metrics import FINE_LATENCY_BUCKETS, MetricsRecorder
from deployments.embedding_pool import PoolReader, await_embeddings, read_embeddings
from deployments.embedding_transfer import IpcEmbedding
from deployments.image_inputs import EmbeddingOpener, PendingImages, merge_images
from deployments.pixel_inputs import ImagePixels, PixelEncoder, PixelInputs
from deployments.vision import observe_encode
from engine.errors import EngineDeadError, EngineInputError
from engine.log_setup import configure_logging
from engine.sampling_params import SamplingParams
from engine.timeline import EncodeRecord, StepRecord, TimelineRead

logger = logging.getLogger(__name__)
# SPLITVL_GIL_SWITCH_INTERVAL_S overrides it (a measurement knob: bench.serve --serve-env).
GIL_SWITCH_INTERVAL_S = float(os.environ.get("SPLITVL_GIL_SWITCH_INTERVAL_S", "0.0005"))
STATS_SETTLE_S = 0.2  # an engine process's gauges are set again this long after a request ends


def engine_config_values(config: AppConfig, model_path: str) -> dict[str, Any]:
    """EngineConfig keyword values from the app config (engine field names)."""
    llm = config.llm
    device = config.resolved_device()
    return {
        "model": model_path,
        "dtype": resolve_dtype(config.dtype, device),
        "device": device,
        "tensor_parallel_size": llm.tensor_parallel_size,
        "max_num_seqs": llm.max_num_seqs,
        "max_model_len": llm.max_model_len,
        "max_num_batched_tokens": llm.max_num_batched_tokens or max(llm.max_model_len, 2048),
        "gpu_memory_utilization": llm.gpu_memory_utilization,
        "num_gpu_blocks": llm.num_gpu_blocks,
        "enforce_eager": llm.enforce_eager,
        "custom_all_reduce": llm.custom_all_reduce,
        "gpus_per_rank": llm.gpus_per_worker if llm.tensor_parallel_size > 1 else 1.0,
        "async_scheduling": llm.async_scheduling,
        "load_format": llm.load_format,
        "seed": config.seed,
        # The replica's in-process vision tower runs on its own stream: the steps go first.
        "high_priority_stream": config.vision.colocate_llm and not config.disable_vision_encoder,
    }


def make_engine_config(config_cls: type, values: dict[str, Any]) -> Any:
    """Build the engine's config from the values its constructor takes."""
    names = set(inspect.signature(config_cls).parameters)
    return config_cls(**{k: v for k, v in values.items() if k in names and v is not None})


class LLMServer:
    """Serve deployment body, or an ingress replica's own engine (`llm.colocate_ingress`).

    `engine_cls` is injectable (tests); `metrics`: the recorder of the replica that owns this
    body when that is not an LLMServer replica (default: this replica's own).
    """

    def __init__(self, app_config: dict[str, Any], engine_cls: type | None = None,
                 metrics: MetricsRecorder | None = None):
        configure_logging()
        self.app_config = app_config
        self.config = AppConfig.model_validate(app_config)
        # The engine's step thread takes the GIL back after every wait on the GPU while
        # this process streams tokens over Ray; CPython hands the GIL over after 5 ms by
        # default, which would stretch each step by up to that much per wait.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        path = ensure_checkpoint(self.config)
        self.engine_process = self.config.llm.engine_process
        # The engine process opens IPC handles only where it runs the model itself (TP 1, GPU).
        self._engine_opens_ipc = (self.engine_process and self.config.llm.tensor_parallel_size == 1
                                  and self.config.resolved_device() == "cuda")
        values = engine_config_values(self.config, str(path))
        # The engine then steps on a stream of its own: inputs made here are finished before it reads them.
        self._engine_stream_apart = values["high_priority_stream"] and not self.engine_process
        self.engine = self._make_engine(engine_cls, values)
        self.metrics = metrics if metrics is not None else MetricsRecorder.for_replica("LLMServer")
        # With the engine in its own process this replica holds no CUDA context: it only
        # releases slots of handles it forwards no more; the engine process reads the rest.
        self.embedding_reader = PoolReader(_node_id(), None if self.engine_process else self._ipc_device())
        self._releases: set[asyncio.Task] = set()  # slots of aborted requests, released once their handles arrive
        self._stats_settle: asyncio.TimerHandle | None = None
        self._encode_cursor = 0  # the engine process' tower calls already in the metrics

    def _make_engine(self, engine_cls: type | None, values: dict[str, Any]) -> Any:
        """`engine_cls` (tests), else `engine.Engine`, or `EngineProcess` under `llm.engine_process`."""
        if engine_cls is None and self.engine_process:
            from engine.core import EngineProcess

            # TP > 1: the engine process joins this replica's Ray cluster and puts the ranks in its group.
            opener = EmbeddingOpener(_node_id(), "cuda") if self._engine_opens_ipc else None
            # vision.colocate_llm: the tower runs in the engine process, on the engine's device.
            encoder = (PixelEncoder(self.app_config, values["device"])
                       if self.config.vision.colocate_llm and needs_vision(self.config) else None)
            return EngineProcess(make_engine_config(EngineProcess.config_class, values), open_inputs=opener,
                                 encoder=encoder)
        if engine_cls is None:
            from engine import Engine as engine_cls
        config_cls = getattr(engine_cls, "config_class", None)
        if config_cls is None:
            from engine import EngineConfig as config_cls
        return engine_cls(make_engine_config(config_cls, values))

    def _ipc_device(self) -> torch.device | None:
        """Where IPC embeddings are copied: this replica's GPU when it runs the model itself (TP 1).

        TP ranks in other processes take them through the object store.
        """
        if self.config.resolved_device() != "cuda" or self.config.llm.tensor_parallel_size != 1:
            return None
        return torch.device("cuda", torch.cuda.current_device())

    @classmethod
    def deployment_options(cls, config: AppConfig) -> dict[str, Any]:
        """Serve options: scaling, queues, resources.

        TP 1 runs the model in the replica process, which then holds the GPU
        itself. TP > 1 runs one TPWorker actor per rank in the replica's
        placement group: one bundle per rank (`gpus_per_worker` of a GPU: over
        0.5, so each rank has a GPU of its own and the rest may take a vision
        replica), the replica's own CPUs merged into bundle 0 (where Serve
        schedules the replica actor).
        """
        llm = config.llm
        opts = llm.scaling_options()
        gpu = config.llm_uses_gpu()
        opts["health_check_period_s"] = 5.0
        opts["health_check_timeout_s"] = 30.0
        if llm.tensor_parallel_size == 1:
            opts["ray_actor_options"] = {"num_cpus": llm.num_cpus, "num_gpus": llm.gpus_per_worker if gpu else 0}
            return opts
        worker = {"GPU": llm.gpus_per_worker} if gpu else {"CPU": 1.0}
        bundles = [dict(worker) for _ in range(llm.tensor_parallel_size)]
        bundles[0]["CPU"] = bundles[0].get("CPU", 0.0) + llm.num_cpus
        opts["ray_actor_options"] = {"num_cpus": llm.num_cpus}
        opts["placement_group_bundles"] = bundles
        opts["placement_group_strategy"] = "STRICT_PACK"
        return opts

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
        mm: list[Any] | None = None, image_hashes: list[str] | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Stream the `TokenDelta`s of one request; the first carries this replica's `server_s`.

        Args:
            mm: one ObjectRef of an `ImageEmbedding` or `IpcEmbedding` per image, in prompt order; or, with
                the tower in the engine process, one `ImagePixels` per image.
            image_hashes: content ids of those images (prefix-cache keys).
        Raises:
            InvalidRequestError: the engine refused the request (e.g. code context_length_exceeded).
        """
        self.metrics.start_pushing()
        received = time.monotonic()
        mm_inputs = await self._multimodal_inputs(mm, tuple(image_hashes) if image_hashes else None)
        added = time.monotonic()
        if mm:
            self.metrics.observe("splitvl_llm_embedding_wait_seconds", added - received, FINE_LATENCY_BUCKETS)
        finished = first = replied = False
        try:
            stream = self.engine.add_request(request_id, prompt_token_ids, mm_inputs, sampling)
            async for out in stream:
                finished = out.finish_reason is not None
                if out.finish_reason == "error" and not self.engine.is_healthy():
                    # A TP worker died: a replica problem (503, check_health restarts us), not the request's.
                    raise ServiceUnavailableError(f"the LLM replica failed ({out.error}); retry the request")
                if out.finish_reason == "error" and not first and isinstance(mm_inputs, (PendingImages, PixelInputs)):
                    # The engine process could not read the IPC handles (slot reused, GPU not visible
                    # there) or its tower failed: as when this replica cannot read them, or a vision
                    # replica died, the router re-encodes once.
                    raise EncoderUnavailableError(f"image embeddings unavailable ({out.error}); retry")
                if not first and out.new_token_ids:
                    first = True
                    self.metrics.observe("splitvl_engine_time_to_first_token_seconds", time.monotonic() - added,
                                         FINE_LATENCY_BUCKETS)
                # This replica's own share of the caller's wait (Serve hops excluded), once.
                server_s = None if replied else time.monotonic() - received
                replied = True
                yield TokenDelta(
                    token_ids=tuple(out.new_token_ids), finish_reason=out.finish_reason,
                    logprobs=tuple(out.logprobs) if out.logprobs else None, error=out.error, server_s=server_s,
                )
                if finished:
                    break
        except EngineInputError as exc:
            raise InvalidRequestError(str(exc), exc.param, code=exc.code) from None
        except EngineDeadError as exc:
            raise ServiceUnavailableError(f"the engine is down: {exc}") from None
        finally:
            if not finished:
                self.engine.abort(request_id)
            self._record_stats()

    async def _multimodal_inputs(self, mm: list[Any] | None, image_hashes: tuple[str, ...] | None) -> Any:
        if not mm:
            return None
        if all(isinstance(m, ImagePixels) for m in mm):
            return PixelInputs(tuple(mm))  # the engine process encodes them (its hashes are the items' keys)
        try:
            items = await await_embeddings(mm, self.embedding_reader, self._releases)
            if self._engine_opens_ipc and any(
                    isinstance(i, IpcEmbedding) and i.pool.node_id == self.embedding_reader.node_id for i in items):
                return PendingImages(tuple(items), image_hashes)  # the engine process reads them
            embeddings = read_embeddings(items, self.embedding_reader)
        except APIError:
            raise
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, APIError):
                raise cause from None
            # The vision replica that held them died (or the objects were lost): the router retries once.
            raise EncoderUnavailableError(f"image embeddings unavailable ({type(exc).__name__}); retry") from None
        merged = merge_images(list(embeddings), image_hashes)
        if self._engine_stream_apart and merged.image_embeds.is_cuda:
            torch.cuda.current_stream().synchronize()  # the merge's copies, queued on this thread's stream
        return merged

    def _record_stats(self) -> None:
        """Set the engine gauges. An engine process' are read from its last step message's
        snapshot (a blocking query here would stall this event loop and take the engine
        process' GIL from its steps), and once more a moment later: the snapshot it sends on
        going idle (the last finish, an abort just sent) then lands in the gauges too."""
        latest = getattr(self.engine, "latest_stats", None)
        if latest is None:
            try:
                stats = self.engine.stats()
            except Exception:  # stats are best effort; health is check_health's job
                return
        else:
            stats = latest()
            if self._stats_settle is None:
                self._stats_settle = asyncio.get_running_loop().call_later(STATS_SETTLE_S, self._settle_stats)
        self._set_gauges(stats)
        self._record_encodes()

    def _record_encodes(self) -> None:
        """The `splitvl_vision_*` metrics of the engine process' tower calls since the last read."""
        read = self.encode_timeline(self._encode_cursor)
        if read is None:
            return
        self._encode_cursor = read.cursor
        for record in read.records:
            observe_encode(self.metrics, record.images, record.end - record.start)

    def _settle_stats(self) -> None:
        self._stats_settle = None
        self._set_gauges(self.engine.latest_stats())

    def _set_gauges(self, stats: Any) -> None:
        total, free = _stat(stats, "num_total_blocks"), _stat(stats, "num_free_blocks")
        if total and free is not None:
            self.metrics.set("splitvl_kv_cache_usage", 1.0 - free / total)
        for key, name in (("num_running", "splitvl_num_requests_running"),
                          ("num_waiting", "splitvl_num_requests_waiting")):
            value = _stat(stats, key)
            if value is not None:
                self.metrics.set(name, value)

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)

    def timeline(self, since: int = 0) -> TimelineRead[StepRecord]:
        """The engine's step records from cursor `since` on (engine/timeline.py)."""
        return self.engine.timeline(since)

    def encode_timeline(self, since: int = 0) -> TimelineRead[EncodeRecord] | None:
        """The engine process' vision tower calls from cursor `since` on (`vision.colocate_llm` with
        `llm.engine_process`); None when the engine runs no tower."""
        read = getattr(self.engine, "encode_timeline", None)
        return read(since) if read is not None and self.config.vision.colocate_llm else None

    async def check_health(self) -> None:
        """Serve calls this periodically; raising restarts the replica."""
        if not self.engine.is_healthy():
            raise RuntimeError("engine is unhealthy (a TP worker died or the step loop failed)")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:
                pass


def _node_id() -> str:
    import ray

    if not ray.is_initialized():  # outside Ray (unit tests): no node, so no IPC handle is ever local
        return ""
    return ray.get_runtime_context().get_node_id()


def _stat(stats: Any, key: str) -> float | None:
    value = stats.get(key) if isinstance(stats, dict) else getattr(stats, key, None)
    return float(value) if isinstance(value, (int, float)) else None
