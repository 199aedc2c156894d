"""Engine configuration (internal, frozen; the Serve layer maps its pydantic config onto it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.timeline import DEFAULT_CAPACITY
from models.loader import LOAD_FORMATS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """One LLM replica.

    model: checkpoint directory. dtype: "float32" | "bfloat16" | "float16".
    device: "cpu" or "cuda". max_model_len: None -> the model's
    max_position_embeddings. num_gpu_blocks: KV blocks per rank (None: on CUDA
    sized so the whole card's use, every process on it, stays within
    gpu_memory_utilization x its total; `cpu_kv_cache_gb` on CPU).
    step_timeout_s: a model step (all TP ranks) slower than this marks the
    engine dead. tp_compiled_graph: with tensor_parallel_size > 1, send the
    steps to the ranks through a Ray compiled graph (False: one actor task per
    rank per step). seed: derives the generators of requests without a seed.
    async_scheduling: with one rank, launch the next decode step before the
    host has read this one's tokens (`engine/engine.py`: the host work of a
    step overlaps the GPU work of the one before). load_format: "auto" reads
    the checkpoint's safetensors; "dummy" makes random weights in place on each
    rank (only config.json is read; for benchmarks and smoke tests: TP ranks draw
    their own shards, so TP=2 differs numerically from TP=1).
    custom_all_reduce: with tensor_parallel_size > 1 on CUDA, sum the small
    bf16/fp16 rows of decode with the one-shot CUDA IPC kernel
    (`models/layers/custom_allreduce.py`) instead of NCCL; the TP ranks then
    see every GPU of the node (each picks its own), which CUDA IPC needs.
    Ignored on CPU and with one rank.
    high_priority_stream: on CUDA with one rank, the step thread runs its steps on
    a high-priority stream of its own, so that kernels this process queues on
    other streams (an in-process vision tower, `vision.colocate_llm`) only take
    the SMs the steps leave free. Ignored on CPU and with TP > 1.
    gpus_per_rank: the GPU share each TP worker actor asks Ray for (with
    tensor_parallel_size > 1 on CUDA): 1 gives each rank a whole GPU; a share
    over 0.5 leaves the rest of each rank's GPU to other actors (a vision
    replica) while no two ranks can land on one GPU.
    """

    model: str
    dtype: str = "bfloat16"
    device: str = "cuda"
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    block_size: int = 16
    num_gpu_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 0.25
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    step_timeout_s: float = 600.0
    tp_compiled_graph: bool = True
    seed: int = 0
    timeline_capacity: int = DEFAULT_CAPACITY
    async_scheduling: bool = True
    load_format: str = "auto"
    custom_all_reduce: bool = False
    gpus_per_rank: float = 1.0
    high_priority_stream: bool = False

    def __post_init__(self) -> None:
        if not 0.5 < self.gpus_per_rank <= 1.0:
            raise ValueError(f"gpus_per_rank must be in (0.5, 1] (two ranks never share a GPU), got {self.gpus_per_rank}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {list(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        positive = ("tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens", "block_size",
                    "timeline_capacity")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError("num_gpu_blocks must be >= 1")
        if not isinstance(self.custom_all_reduce, bool):
            raise ValueError(f"custom_all_reduce must be a bool, got {self.custom_all_reduce!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
