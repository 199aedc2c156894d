"""HF `config.json` -> frozen dataclasses for the text and vision parts.

Only this module (and the model files) read HF configs; layers take plain ints.
Both spellings of the RoPE settings are accepted: transformers 5's
`rope_parameters` (`rope_theta`, `mrope_section`, `mrope_interleaved`,
`partial_rotary_factor`) and the 4.x `rope_theta` + `rope_scaling` that the
published Qwen3-VL checkpoints use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.architectures import ARCHITECTURES, Architecture

class ConfigError(ValueError):
    """config.json is missing, unreadable or inconsistent."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one splitvl can serve."""

    def __init__(self, architecture: str | None):
        self.architecture = architecture
        super().__init__(
            f"unsupported architecture {architecture!r}; supported: "
            + ", ".join(ARCHITECTURES)
        )


@dataclass(frozen=True, slots=True)
class TextConfig:
    """The decoder: dense or MoE Qwen3, or the hybrid Qwen3.5."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 1.0
    # None: plain 1-D RoPE (text-only models). Otherwise T/H/W frequency counts.
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False
    # MoE (num_experts == 0 means dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    # Qwen3.5 hybrid decoder (layer_types None: every layer is full attention).
    layer_types: tuple[str, ...] | None = None
    attn_output_gate: bool = False
    linear_conv_kernel_dim: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    # Std of the random init (`load_format: dummy`, models/random_weights.py).
    initializer_range: float = 0.02

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (the first `rotary_dim` of `head_dim`)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses the sparse MoE block (HF's rule)."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def layer_type(self, layer_idx: int) -> str:
        """"full_attention" or "linear_attention"."""
        return "full_attention" if self.layer_types is None else self.layer_types[layer_idx]

    @property
    def is_hybrid(self) -> bool:
        return self.layer_types is not None and "linear_attention" in self.layer_types


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """The Qwen3-VL / Qwen3.5 ViT."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = ()
    hidden_act: str = "gelu_pytorch_tanh"
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: C * Tp * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LLM token."""
        return self.spatial_merge_size**2


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A parsed config.json. `vision` is set exactly when the architecture is
    vision-language (`models/architectures.py`); whether a deployment serves
    images is `models.registry.get_task`."""

    architecture: str
    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def placeholder_token_ids(self) -> tuple[int, ...]:
        """Tokens whose embeddings the vision encoder replaces: `<|image_pad|>`, `<|video_pad|>`."""
        return tuple(t for t in (self.image_token_id, self.video_token_id) if t is not None)


def _rope_settings(cfg: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    """RoPE fields from `rope_parameters` (5.x) or `rope_theta`/`rope_scaling` (4.x).

    The VL decoders read them as transformers does: the architecture's default
    section when the file has none, and always interleaved.
    """
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"unsupported rope_type {rope_type!r} (only default RoPE / mRoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    section = params.get("mrope_section") or arch.mrope_section
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return {
        "rope_theta": float(theta),
        "mrope_section": tuple(int(s) for s in section) if section else None,
        "mrope_interleaved": arch.mrope_section is not None or bool(params.get("mrope_interleaved", False)),
        "partial_rotary_factor": float(partial),
    }


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: missing required field {key!r}")
    return cfg[key]


def _layer_types(cfg: dict[str, Any], layers: int, hybrid: bool) -> tuple[str, ...] | None:
    layer_types = cfg.get("layer_types")
    if cfg.get("use_sliding_window"):
        raise ConfigError("sliding-window attention is not supported")
    if not hybrid:
        if layer_types and set(layer_types) != {"full_attention"}:
            raise ConfigError(f"unsupported layer_types {sorted(set(layer_types))}")
        return None
    if layer_types is None:
        interval = int(cfg.get("full_attention_interval", 4))
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
        ]
    if len(layer_types) != layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries for {layers} layers")
    unknown = set(layer_types) - {"full_attention", "linear_attention"}
    if unknown:
        raise ConfigError(f"unsupported layer_types {sorted(unknown)}")
    return tuple(layer_types)


def text_config_from_hf(
    cfg: dict[str, Any], arch: Architecture, *, tie_word_embeddings: bool | None = None
) -> TextConfig:
    """Parse an HF text config (a VL model's `text_config` or a flat causal-LM config).

    Args:
        cfg: the dict.
        arch: the registry entry of the architecture it belongs to (decides
            defaults and the Qwen3.5 hybrid fields).
        tie_word_embeddings: overrides the dict's own flag (the top level of a
            VL config wins over its text_config, as in transformers).
    """
    where = "text_config"
    hybrid = arch.hybrid
    heads = int(_require(cfg, "num_attention_heads", where))
    hidden = int(_require(cfg, "hidden_size", where))
    head_dim = cfg.get("head_dim") or arch.default_head_dim or hidden // heads
    layers = int(_require(cfg, "num_hidden_layers", where))
    num_experts = int(cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0)
    layer_types = _layer_types(cfg, layers, hybrid)
    tie = cfg.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
    norm_topk = arch.always_norm_topk or bool(cfg.get("norm_topk_prob", False))
    return TextConfig(
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        tie_word_embeddings=bool(tie),
        **_rope_settings(cfg, arch),
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0) if num_experts else 0,
        norm_topk_prob=norm_topk,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0) if num_experts else 0,
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1) or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0) or 0)
        if num_experts
        else 0,
        layer_types=layer_types,
        attn_output_gate=hybrid,
        linear_conv_kernel_dim=int(cfg.get("linear_conv_kernel_dim", 4)) if hybrid else 0,
        linear_key_head_dim=int(cfg.get("linear_key_head_dim", 128)) if hybrid else 0,
        linear_value_head_dim=int(cfg.get("linear_value_head_dim", 128)) if hybrid else 0,
        linear_num_key_heads=int(cfg.get("linear_num_key_heads", 16)) if hybrid else 0,
        linear_num_value_heads=int(cfg.get("linear_num_value_heads", 32)) if hybrid else 0,
        initializer_range=float(cfg.get("initializer_range") or 0.02),
    )


def vision_config_from_hf(cfg: dict[str, Any]) -> VisionConfig:
    where = "vision_config"
    return VisionConfig(
        depth=int(_require(cfg, "depth", where)),
        hidden_size=int(_require(cfg, "hidden_size", where)),
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        num_heads=int(_require(cfg, "num_heads", where)),
        out_hidden_size=int(_require(cfg, "out_hidden_size", where)),
        in_channels=int(cfg.get("in_channels", 3)),
        patch_size=int(cfg.get("patch_size", 16)),
        spatial_merge_size=int(cfg.get("spatial_merge_size", 2)),
        temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
        num_position_embeddings=int(cfg.get("num_position_embeddings", 2304)),
        deepstack_visual_indexes=tuple(int(i) for i in cfg.get("deepstack_visual_indexes") or ()),
        hidden_act=str(cfg.get("hidden_act", "gelu_pytorch_tanh")),
        initializer_range=float(cfg.get("initializer_range") or 0.02),
    )


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _validate(text: TextConfig, vision: VisionConfig | None) -> None:
    """Inconsistencies transformers would not catch but that give wrong outputs."""
    if text.num_attention_heads % text.num_key_value_heads:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
    if text.mrope_section is not None and 2 * sum(text.mrope_section) != text.rotary_dim:
        raise ConfigError(
            f"mrope_section {list(text.mrope_section)} must sum to rotary_dim/2 = {text.rotary_dim // 2}"
        )
    if text.is_moe and not 0 < text.num_experts_per_tok <= text.num_experts:
        raise ConfigError("num_experts_per_tok must be in [1, num_experts]")
    if vision is not None:
        if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
            raise ConfigError("more deepstack levels than decoder layers")
        if any(not 0 <= i < vision.depth for i in vision.deepstack_visual_indexes):
            raise ConfigError("deepstack_visual_indexes out of the vision depth")
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError("vision out_hidden_size must equal the text hidden_size")


def model_config_from_hf(
    cfg: dict[str, Any], generation_config: dict[str, Any] | None = None
) -> ModelConfig:
    """Parse an HF config.json dict (plus generation_config.json, if any)."""
    names = cfg.get("architectures") or []
    arch = ARCHITECTURES.get(names[0]) if names else None
    if arch is None:
        raise UnsupportedArchitectureError(names[0] if names else None)
    if arch.is_vl:
        text_dict = _require(cfg, "text_config", arch.name)
        vision = vision_config_from_hf(_require(cfg, "vision_config", arch.name))
    else:
        text_dict, vision = cfg, None
    tie = cfg.get("tie_word_embeddings", text_dict.get("tie_word_embeddings", False))
    text = text_config_from_hf(text_dict, arch, tie_word_embeddings=bool(tie))
    eos: list[int] = []
    for source in (generation_config or {}, cfg, text_dict):
        eos += [i for i in _as_ids(source.get("eos_token_id")) if i not in eos]
    _validate(text, vision)
    if text.is_moe != arch.moe:
        raise ConfigError(f"{arch.name}: num_experts {text.num_experts} does not fit a "
                          f"{'MoE' if arch.moe else 'dense'} architecture")
    return ModelConfig(
        architecture=arch.name,
        model_type=str(cfg.get("model_type", "")),
        text=text,
        vision=vision,
        image_token_id=cfg.get("image_token_id") if vision else None,
        video_token_id=cfg.get("video_token_id") if vision else None,
        vision_start_token_id=cfg.get("vision_start_token_id") if vision else None,
        vision_end_token_id=cfg.get("vision_end_token_id") if vision else None,
        tie_word_embeddings=bool(tie),
        eos_token_ids=tuple(eos),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json` (and `generation_config.json` if present).

    Raises:
        ConfigError: missing/invalid config.json or required field.
        UnsupportedArchitectureError: `architectures[0]` is not supported.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}")
    gen_path = Path(model_dir) / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    return model_config_from_hf(_read_json(path), gen)
