"""LLaVA-1.5's torch half: loading checkpoints, random weights at real sizes, the seeded tiny
checkpoint, the vision graph and its FLOP shape. :class:`apet.models.llava.family` reaches these through
``Family.torch_half()`` when export, the torch backend or a benchmark asks (the device never imports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.family import Selector


def load(path: Path, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
    from apet.adapters.llava.adapter import LlavaAdapter

    return LlavaAdapter.load(path, dtype=dtype, device=device)


def random_init(shape_name: str, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
    from apet.adapters.llava.adapter import LlavaAdapter
    from apet.adapters.llava.shapes import shapes_config

    return LlavaAdapter.random_init(shapes_config(shape_name), dtype=dtype, device=device)


def tiny_checkpoint() -> Path:
    from apet.adapters.llava.tiny import ensure_tiny_llava

    return ensure_tiny_llava()


def vision_stages(adapter: "VisionLanguageAdapter", select: Selector) -> Any:
    from apet.adapters.llava.vision import LlavaVisionStages

    return LlavaVisionStages(adapter, select)


def vision_flops_shape(adapter: "VisionLanguageAdapter") -> Any:
    from apet.adapters.shared.llava_base import clip_flops_shape

    return clip_flops_shape(adapter)
