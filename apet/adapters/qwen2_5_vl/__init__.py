"""Qwen2.5-VL's torch half: loading checkpoints, random weights at real sizes, the seeded tiny
checkpoint, the vision graph and its FLOP shape. :class:`apet.models.qwen2_5_vl.family` reaches these through
``Family.torch_half()`` when export, the torch backend or a benchmark asks (the device never imports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.family import Selector
from apet.models.qwen2_5_vl.family import TYPICAL_IMAGE


def load(path: Path, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
    from apet.adapters.qwen2_5_vl.adapter import QwenAdapter

    return QwenAdapter.load(path, dtype=dtype, device=device)


def random_init(shape_name: str, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
    from apet.adapters.qwen2_5_vl.adapter import QwenAdapter
    from apet.adapters.qwen2_5_vl.shapes import shapes_config

    return QwenAdapter.random_init(shapes_config(shape_name), dtype=dtype, device=device)


def tiny_checkpoint() -> Path:
    from apet.adapters.qwen2_5_vl.tiny import ensure_tiny_qwen

    return ensure_tiny_qwen()


def vision_stages(adapter: "VisionLanguageAdapter", select: Selector) -> Any:
    from apet.adapters.qwen2_5_vl.vision import QwenVisionStages

    return QwenVisionStages(adapter, select)


def vision_flops_shape(adapter: "VisionLanguageAdapter",
                       image_size: tuple[int, int] = TYPICAL_IMAGE) -> Any:
    """The ViT at an image of ``image_size`` (width, height): its patches, 112-px windows (64 patches) in all
    but the full-attention blocks, a temporal patch of 2; the merger (~2 % of the FLOPs) is not counted and no
    projector runs after ApET."""
    from apet.contracts.specs import VisionShape
    from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe, patch_grid

    vit = adapter.model.config.vision_config
    recipe = QwenImageRecipe.from_json(adapter.spec.processor)
    rows, cols = patch_grid(*image_size, recipe)
    return VisionShape(tokens=rows * cols, dim=vit.hidden_size, mlp_dim=vit.intermediate_size, layers=vit.depth,
                       patch=vit.patch_size, window=(recipe.window_size // recipe.patch_size) ** 2,
                       full_layers=len(vit.fullatt_block_indexes), projector=False,
                       temporal=recipe.temporal_patch_size)
