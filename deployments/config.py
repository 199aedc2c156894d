"""User-facing configuration of a splitvl Serve application (pydantic, from YAML).

The same dict is the `args:` of a Serve config (`import_path:
deployments.app:build_app`) and the body of `configs/*.yaml`. Every model
forbids unknown keys, so a typo fails at build time naming the field.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.model_source import is_repo_id, resolve_repo
from models.architectures import TINY
from models.loader import LOAD_FORMATS

LoadFormat = Literal[LOAD_FORMATS]  # "auto" | "dummy"
LOAD_FORMAT_DESCRIPTION = (
    "auto = read the checkpoint's safetensors; dummy = random weights made in place on the replica's "
    "device (transformers' init; only config.json, tokenizer and preprocessor files are read), for "
    "benchmarks and smoke tests of shapes whose checkpoint is not on disk."
)

TINY_CACHE_DIR = Path("~/.cache/splitvl").expanduser()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling for one deployment (a subset of Serve's own options)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(1, ge=1, description="Most replicas started under load.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at startup.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds of overload before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Seconds of idleness before scaling down.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class _Scaled(_Strict):
    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replica count (mutually exclusive with autoscaling_config)."
    )
    autoscaling_config: AutoscalingConfig | None = Field(
        None, description="Autoscale between min and max replicas instead of a fixed count."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests a replica works on at once (Serve's max_ongoing_requests)."
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests waiting per caller before 503 (-1: unbounded)."
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> _Scaled:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    def scaling_options(self) -> dict[str, Any]:
        """Serve deployment options for replica count / autoscaling and queues."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


class VisionDeploymentConfig(_Scaled):
    """The VisionEncoder deployment."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per vision replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per vision replica; fractions share a GPU.")
    max_batch_size: int = Field(16, ge=1, description="Most images encoded in one tower call.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long an image that finds the tower idle waits for others to batch with "
        "(images that arrive during a tower call join the next one without waiting)."
    )
    embedding_transfer: Literal["auto", "object_store"] = Field(
        "auto",
        description="How embeddings reach LLM replicas: auto = CUDA IPC from a pooled GPU buffer to LLM "
        "replicas on the same node (object store for others, for CPU replicas, and when the pool is full); "
        "object_store = always through Ray's object store (device -> host -> device copies).",
    )
    embedding_pool_mb: int = Field(
        512, ge=0, description="GPU buffer of a vision replica for IPC transfers, in MiB, allocated at start "
        "(an 8B model's 1024x1024 image takes 32 MiB); 0 turns IPC off."
    )
    embedding_lease_s: float = Field(
        60.0, gt=0, description="A pool slot no LLM replica has released after this long is reclaimed."
    )
    load_format: LoadFormat = Field("auto", description="Vision tower weights: " + LOAD_FORMAT_DESCRIPTION)
    colocate_llm: bool = Field(
        False, description="Run the vision tower inside each LLM replica instead of a VisionEncoder deployment: "
        "on the replica's GPU, in its process, on a CUDA stream of its own while the engine steps on a "
        "high-priority stream, so decode kernels go first and the tower fills the SMs they leave (one CUDA "
        "context: no time slicing against another process, no embedding transfer). With llm.engine_process "
        "the tower runs in the engine process instead (the router sends it the resized pixels; a thread there "
        "batches and encodes them, and a cache of embeddings on the GPU, embedding_cache_bytes, spares a "
        "repeated image the tower). Needs llm.colocate_ingress and tensor_parallel_size 1; the replica's "
        "GPU share (llm.gpus_per_worker) covers both, num_gpus, num_replicas and the IPC settings here are "
        "unused, and the embedding cache (embedding_cache_bytes) holds GPU memory."
    )


class LLMDeploymentConfig(_Scaled):
    """The LLMServer deployment and its engine."""

    tensor_parallel_size: int = Field(1, ge=1, description="TP ranks (GPUs) per LLM replica.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs of the replica actor itself.")
    gpus_per_worker: float = Field(
        1.0, gt=0, le=1, description="GPU share of each TP rank (below 1 to share a GPU with vision; over 0.5 "
        "with tensor_parallel_size > 1, so that every rank has a GPU of its own). It only places the ranks: "
        "memory is gpu_memory_utilization's."
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one engine step.")
    max_model_len: int = Field(4096, ge=16, description="Prompt + completion tokens per sequence.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Token budget of one engine step (default: max(max_model_len, 2048))."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of each GPU's whole memory in use (by every process on it, "
        "vision replicas included) up to which the engine sizes its KV cache; the rest is left to the others."
    )
    num_gpu_blocks: int | None = Field(
        None, ge=1, description="Fixed KV block count (overrides gpu_memory_utilization; CPU default 512)."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs.")
    custom_all_reduce: bool = Field(
        False, description="With tensor_parallel_size > 1 on GPUs with P2P access, sum the small rows of decode "
        "with a one-shot CUDA IPC all-reduce instead of NCCL (larger ones still go through NCCL)."
    )
    async_scheduling: bool = Field(
        True, description="With one rank, launch the next decode step while the host reads this one's tokens."
    )
    load_format: LoadFormat = Field(
        "auto", description="Language model weights: " + LOAD_FORMAT_DESCRIPTION + " Each TP rank draws its "
        "own shard, so TP=2 differs numerically from TP=1."
    )
    colocate_ingress: bool = Field(
        False, description="Run each LLM replica's engine inside an OpenAI ingress replica (no LLMServer "
        "deployment): tokens reach the HTTP stream without a Serve hop. The ingress then has the LLM's replicas, "
        "resources and queue bounds (an explicit ingress_replicas must equal num_replicas); vision stays its own "
        "deployment. For one LLM replica per ingress; HTTP work then shares the engine's process and GIL."
    )
    engine_process: bool = Field(
        False, description="Run the engine in a process of its own, spawned by the replica (its own GIL and "
        "busy step loop; the replica only validates, streams and forwards each step's deltas). For one GPU "
        "serving many concurrent streams, where the replica's per-token work (Serve streaming, a colocated "
        "ingress' HTTP work) otherwise delays the engine's steps. With tensor_parallel_size > 1 that process "
        "joins the replica's Ray cluster and drives the TP workers (in the replica's placement group) from there. "
        "Costs one more process and its start-up."
    )


    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> LLMDeploymentConfig:
        if self.gpus_per_worker <= 0.5 and self.tensor_parallel_size > 1:
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker} with tensor_parallel_size {self.tensor_parallel_size}: "
                "two ranks could land on one GPU; give each TP rank more than 0.5 of a GPU")
        return self


class LimitsConfig(_Strict):
    """What one request may ask for; everything over a limit is a 4xx."""

    max_images_per_request: int = Field(8, ge=0, description="Images in one request.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Pixels (w*h) per image, checked from its header before decoding."
    )
    max_request_bytes: int = Field(20 * 2**20, ge=1024, description="HTTP body size (413 above).")
    media_fetch_timeout_s: float = Field(10.0, gt=0, description="Total time to fetch one image URL.")
    max_media_bytes: int = Field(20 * 2**20, ge=1, description="Encoded bytes of one image.")
    allowed_media_domains: list[str] = Field(
        default_factory=list,
        description="If non-empty, http(s) image hosts must be one of these (or a subdomain).",
    )
    allowed_media_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs image URLs may resolve into although private/loopback (e.g. 10.0.0.0/8).",
    )
    allowed_local_media_path: str | None = Field(
        None, description="Directory whose files may be used as images (file:// URLs); off if unset."
    )
    max_videos_per_request: int = Field(2, ge=0, description="Videos in one request.")
    max_video_bytes: int = Field(64 * 2**20, ge=1, description="Encoded bytes of one video (URL or file).")
    max_video_seconds: float = Field(600.0, gt=0, description="Duration of one video, from its header and while decoding.")
    max_video_frames: int = Field(
        36_000, ge=1, description="Frames decoded from one video (before sampling), from its header and while decoding."
    )
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens accepted.")
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    max_prompts_per_request: int = Field(
        64, ge=1, description="Prompts in one /v1/completions request (a list of prompts); each gets n choices."
    )
    max_stop_strings: int = Field(8, ge=0, description="Most stop strings per request.")
    request_timeout_s: float = Field(600.0, gt=0, description="Whole-request time limit (408 after).")

    @field_validator("allowed_media_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("allowed_media_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [d.strip().lower().rstrip(".") for d in value if d.strip()]


class AppConfig(_Strict):
    """One splitvl application: a model, its vision and LLM deployments, limits."""

    model: str | None = Field(
        None,
        description="Checkpoint directory (safetensors), or a Hugging Face repo id (`org/name`) resolved "
        "through the HF cache (HF_HOME; downloaded unless HF_HUB_OFFLINE=1).",
    )
    revision: str | None = Field(
        None, description="Branch, tag or commit of a Hugging Face repo id `model` (default: main)."
    )
    model_id: str | None = Field(
        None, description="Served model name (default: the repo id, or the directory name)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/compute dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run.")
    disable_vision_encoder: bool = Field(
        False,
        alias="language_model_only",
        description="Serve text only: no vision deployment, no vision weights; images get a 400.",
    )
    create_tiny_if_missing: str | None = Field(
        None,
        description="Demo only: write a tiny random checkpoint of this arch if `model` is missing "
        f"(one of {', '.join(TINY)}).",
    )
    vision: VisionDeploymentConfig = Field(default_factory=VisionDeploymentConfig)
    llm: LLMDeploymentConfig = Field(default_factory=LLMDeploymentConfig)
    ingress_replicas: int = Field(
        1, ge=1, description="OpenAI ingress (FastAPI) replicas; each runs a router (its own embedding cache)."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    api_key: str | None = Field(None, description="Bearer key for /v1/* (or env SPLITVL_API_KEY).")
    embedding_cache_bytes: int = Field(
        256 * 2**20, ge=0, description="Embedding-cache budget in bytes (0 disables)."
    )
    seed: int = Field(0, description="Engine seed for requests without one.")

    @model_validator(mode="after")
    def _ingress_replicas_with_colocation(self) -> AppConfig:
        """Colocated, each LLM replica is an ingress replica: an explicit `ingress_replicas` must say so."""
        llm = self.llm
        if not llm.colocate_ingress or "ingress_replicas" not in self.model_fields_set:
            return self
        if llm.autoscaling_config is not None or self.ingress_replicas != (llm.num_replicas or 1):
            llm_replicas = "autoscaled" if llm.autoscaling_config is not None else str(llm.num_replicas or 1)
            raise ValueError(
                f"ingress_replicas={self.ingress_replicas} does not match the LLM's replicas ({llm_replicas}): with "
                "llm.colocate_ingress each LLM replica is an ingress replica; leave ingress_replicas out and set "
                "llm.num_replicas or llm.autoscaling_config")
        return self

    @model_validator(mode="after")
    def _vision_in_the_llm_replica(self) -> AppConfig:
        llm = self.llm
        if self.vision.colocate_llm and (not llm.colocate_ingress or llm.tensor_parallel_size != 1):
            raise ValueError(
                "vision.colocate_llm runs the tower beside the engine, in the process that runs the model (the "
                "colocated ingress replica's, or its engine process with llm.engine_process): it needs "
                f"llm.colocate_ingress: true and llm.tensor_parallel_size: 1 (got colocate_ingress: "
                f"{str(llm.colocate_ingress).lower()}, tensor_parallel_size: {llm.tensor_parallel_size})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _accept_both_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "disable_vision_encoder" in data and "language_model_only" in data:
            if bool(data["disable_vision_encoder"]) != bool(data["language_model_only"]):
                raise ValueError("disable_vision_encoder and language_model_only disagree")
            data = {k: v for k, v in data.items() if k != "language_model_only"}
        return data

    @field_validator("create_tiny_if_missing")
    @classmethod
    def _known_tiny(cls, name: str | None) -> str | None:
        if name is not None and name not in TINY:
            raise ValueError(f"unknown tiny architecture {name!r}; choose one of {', '.join(TINY)}")
        return name

    @model_validator(mode="after")
    def _model_source(self) -> AppConfig:
        if self.model is None and self.create_tiny_if_missing is None:
            raise ValueError("model: a checkpoint directory is required")
        if self.model is not None and self.create_tiny_if_missing is None:
            if not Path(self.model).expanduser().is_dir() and not is_repo_id(self.model):
                raise ValueError(
                    f"model: {self.model!r} is not a directory or a Hugging Face repo id (org/name)"
                )
        if self.revision is not None and not self.from_hub:
            raise ValueError("revision applies to a Hugging Face repo id `model` only")
        return self

    @property
    def from_hub(self) -> bool:
        """Whether `model` is a Hugging Face repo id (resolved through the HF cache)."""
        return self.model is not None and self.create_tiny_if_missing is None and is_repo_id(self.model)

    @property
    def model_path(self) -> Path:
        """Checkpoint directory: `model`, the snapshot of its repo id (downloaded unless
        HF_HUB_OFFLINE), or the tiny demo default under ~/.cache/splitvl.

        Raises:
            ModelNotFoundError for a repo id that cannot be resolved.
        """
        if self.from_hub:
            return resolve_repo(self.model, self.revision)
        if self.model is not None:
            return Path(self.model).expanduser()
        return TINY_CACHE_DIR / f"tiny-{self.create_tiny_if_missing}"

    @property
    def served_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        return self.model if self.from_hub else self.model_path.name

    def resolved_api_key(self) -> str | None:
        """The API key from config, else env SPLITVL_API_KEY, else None (auth off)."""
        return self.api_key or os.environ.get("SPLITVL_API_KEY") or None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.llm_uses_gpu() else "cpu"

    def llm_uses_gpu(self) -> bool:
        """Whether LLM replicas ask Ray for GPUs (device cuda, or auto with GPUs in the cluster)."""
        if self.device == "cuda":
            return True
        if self.device == "cpu":
            return False
        import torch

        return torch.cuda.is_available()

    @classmethod
    def from_yaml(cls, path: str | Path) -> AppConfig:
        """Load from a Serve config (`applications[0].args`) or a bare args mapping."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(args_from_serve_yaml(data))


def needs_vision(config: AppConfig) -> bool:
    """Whether the app needs a vision tower: its VisionEncoder deployment, or the one in the colocated replica."""
    if config.disable_vision_encoder:
        return False
    if config.create_tiny_if_missing is not None and not (config.model_path / "config.json").is_file():
        return TINY[config.create_tiny_if_missing].is_vl
    from models.config import load_model_config
    from models.registry import get_task

    return get_task(load_model_config(config.model_path)).task == "vl"


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype name models run in: `auto` is bfloat16 on cuda, float32 on cpu."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def args_from_serve_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """The `args` of the first application of a Serve config dict, or `data` itself."""
    if "applications" in data:
        apps = data["applications"] or []
        if not apps:
            raise ValueError("the Serve config has no applications")
        return dict(apps[0].get("args") or {})
    return data


def ensure_checkpoint(config: AppConfig) -> Path:
    """The checkpoint directory; writes the tiny demo checkpoint once if asked to.

    Written to a temporary directory and renamed, so concurrent replicas never
    see a half-written checkpoint.
    """
    path = config.model_path
    if (path / "config.json").is_file():
        return path
    if config.create_tiny_if_missing is None:
        raise FileNotFoundError(f"model: no config.json in {path}")
    import tempfile

    from models.tiny import write_tiny_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    write_tiny_checkpoint(config.create_tiny_if_missing, tmp, seed=0)
    try:
        tmp.rename(path)
    except OSError:
        # Another process won the race; theirs is complete (renames are atomic).
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
