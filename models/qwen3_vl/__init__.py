"""Qwen3-VL parts that are not shared layers: the vision tower (`models.qwen3_vl.vision`)."""
