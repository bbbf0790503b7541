"""Qwen3-VL's torch half (apet/adapters/shared/half.py): checkpoints, random weights at real sizes, the tiny
checkpoint and the vision graph; the device never imports it."""

from __future__ import annotations

from typing import Any

from apet.adapters.qwen3_vl.adapter import Qwen3Adapter
from apet.adapters.qwen3_vl.shapes import shapes_config
from apet.adapters.qwen3_vl.tiny import ensure_tiny_qwen3
from apet.adapters.qwen3_vl.vision import Qwen3VisionStages
from apet.adapters.shared.half import TorchHalf
from apet.contracts.specs import VisionShape
from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.qwen2_5_vl.family import TYPICAL_IMAGE
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe, patch_grid


def vision_flops_shape(adapter: VisionLanguageAdapter, image_size: tuple[int, int] = TYPICAL_IMAGE) -> Any:
    """The ViT at an image of ``image_size`` (width, height): its 16-px patches, full attention in every block, a
    temporal patch of 2; the mergers (main and DeepStack, a few % of the FLOPs) are not counted and no projector
    runs after ApET."""
    vit = adapter.model.config.vision_config
    recipe = QwenImageRecipe.from_json(adapter.spec.processor)
    rows, cols = patch_grid(*image_size, recipe)
    return VisionShape(tokens=rows * cols, dim=vit.hidden_size, mlp_dim=vit.intermediate_size, layers=vit.depth,
                       patch=vit.patch_size, projector=False, temporal=recipe.temporal_patch_size)


HALF = TorchHalf(Qwen3Adapter, shapes_config, ensure_tiny_qwen3, Qwen3VisionStages, vision_flops_shape)
