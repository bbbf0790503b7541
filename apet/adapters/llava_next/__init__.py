"""LLaVA-NeXT's torch half: loading checkpoints, random weights at real sizes, the seeded tiny
checkpoint, the vision graph and its FLOP shape. :class:`apet.models.llava_next.family` reaches these through
``Family.torch_half()`` when export, the torch backend or a benchmark asks (the device never imports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.family import Selector


def load(path: Path, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
    from apet.adapters.llava_next.adapter import LlavaNextAdapter

    return LlavaNextAdapter.load(path, dtype=dtype, device=device)


def random_init(shape_name: str, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
    from apet.adapters.llava_next.adapter import LlavaNextAdapter
    from apet.adapters.llava_next.shapes import shapes_config

    return LlavaNextAdapter.random_init(shapes_config(shape_name), dtype=dtype, device=device)


def tiny_checkpoint() -> Path:
    from apet.adapters.llava_next.tiny import ensure_tiny_llava_next

    return ensure_tiny_llava_next()


def vision_stages(adapter: "VisionLanguageAdapter", select: Selector) -> Any:
    from apet.adapters.llava_next.vision import LlavaNextVisionStages

    return LlavaNextVisionStages(adapter, select)


def vision_flops_shape(adapter: "VisionLanguageAdapter") -> Any:
    from apet.adapters.shared.llava_base import clip_flops_shape

    return clip_flops_shape(adapter)
