"""The supported HF architectures: one entry each, the only place that lists them.

`architectures[0]` of config.json picks the entry. An entry says where the
model classes live, the facts that config parsing, task selection and the tiny
checkpoints ask about (VL, hybrid, MoE, transformers' defaults), and the name
of its tiny test checkpoint. Model classes are named by import path and
imported only when built (`models/registry.py`), so a dependency that only
Qwen3.5 needs cannot break serving Qwen3-VL. This module imports nothing from
the rest of `models`, so config parsing can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class Architecture:
    """One HF architecture and what splitvl knows about it.

    name: HF `architectures[0]` (also the transformers model class).
    language_model / vision_model: `module:Class` of our decoder and ViT;
        `vision_model` None means a text-only (flat) config.json.
    hybrid: Qwen3.5 decoder (Gated DeltaNet + gated full attention, `layer_types`).
    moe: the decoder has sparse MoE layers.
    default_head_dim: transformers' `head_dim` when config.json omits it
        (None: hidden_size // num_attention_heads).
    always_norm_topk: the MoE block renormalizes its top-k weights whatever
        `norm_topk_prob` says.
    mrope_section: transformers' mRoPE section when config.json omits it; set
        only for the VL decoders, whose rotary embedding always interleaves the
        sections (transformers reads no `mrope_interleaved` flag for them).
    tiny: name of its tiny random checkpoint (`models/tiny.py`; also its HF
        `model_type`), None if it has none.
    """

    name: str
    language_model: str
    vision_model: str | None = None
    hybrid: bool = False
    moe: bool = False
    default_head_dim: int | None = None
    always_norm_topk: bool = False
    mrope_section: tuple[int, ...] | None = None
    tiny: str | None = None

    @property
    def is_vl(self) -> bool:
        """Whether the architecture has a vision tower (config.json nests text_config/vision_config)."""
        return self.vision_model is not None


_QWEN3_LM = "models.qwen3:Qwen3ForCausalLM"
_QWEN3_5_LM = "models.qwen3_5:Qwen3_5ForCausalLM"
_VISION = "models.qwen3_vl.vision:Qwen3VLVisionModel"
_QWEN3_VL_MROPE = (24, 20, 20)
_QWEN3_5_MROPE = (11, 11, 10)

ARCHITECTURES: MappingProxyType[str, Architecture] = MappingProxyType({
    arch.name: arch
    for arch in (
        Architecture("Qwen3VLForConditionalGeneration", _QWEN3_LM, _VISION, default_head_dim=128,
                     mrope_section=_QWEN3_VL_MROPE, tiny="qwen3_vl"),
        Architecture("Qwen3VLMoeForConditionalGeneration", _QWEN3_LM, _VISION, moe=True, always_norm_topk=True,
                     mrope_section=_QWEN3_VL_MROPE, tiny="qwen3_vl_moe"),
        Architecture("Qwen3_5ForConditionalGeneration", _QWEN3_5_LM, _VISION, hybrid=True, default_head_dim=256,
                     mrope_section=_QWEN3_5_MROPE, tiny="qwen3_5"),
        Architecture("Qwen3_5MoeForConditionalGeneration", _QWEN3_5_LM, _VISION, hybrid=True, moe=True,
                     default_head_dim=256, always_norm_topk=True, mrope_section=_QWEN3_5_MROPE, tiny="qwen3_5_moe"),
        Architecture("Qwen3ForCausalLM", _QWEN3_LM, default_head_dim=128),
        Architecture("Qwen3MoeForCausalLM", _QWEN3_LM, moe=True),
    )
})

TINY: MappingProxyType[str, Architecture] = MappingProxyType(
    {arch.tiny: arch for arch in ARCHITECTURES.values() if arch.tiny is not None}
)
"""Tiny checkpoint name -> its architecture, in registry order."""
