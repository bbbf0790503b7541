"""Qwen2.5-VL's torch half (apet/adapters/shared/half.py): checkpoints, random weights at real sizes, the tiny
checkpoint and the vision graph. :mod:`apet.models` reaches it through ``Family.torch_half()`` when export, the
torch backend or a benchmark asks; the device never imports it."""

from __future__ import annotations

from typing import Any

from apet.adapters.qwen2_5_vl.adapter import QwenAdapter
from apet.adapters.qwen2_5_vl.shapes import shapes_config
from apet.adapters.qwen2_5_vl.tiny import ensure_tiny_qwen
from apet.adapters.qwen2_5_vl.vision import QwenVisionStages
from apet.adapters.shared.half import TorchHalf
from apet.contracts.specs import VisionShape
from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.qwen2_5_vl.family import TYPICAL_IMAGE
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe, patch_grid


def vision_flops_shape(adapter: VisionLanguageAdapter, image_size: tuple[int, int] = TYPICAL_IMAGE) -> Any:
    """The ViT at an image of ``image_size`` (width, height): its patches, 112-px windows (64 patches) in all
    but the full-attention blocks, a temporal patch of 2; the merger (~2 % of the FLOPs) is not counted and no
    projector runs after ApET."""
    vit = adapter.model.config.vision_config
    recipe = QwenImageRecipe.from_json(adapter.spec.processor)
    rows, cols = patch_grid(*image_size, recipe)
    return VisionShape(tokens=rows * cols, dim=vit.hidden_size, mlp_dim=vit.intermediate_size, layers=vit.depth,
                       patch=vit.patch_size, window=(recipe.window_size // recipe.patch_size) ** 2,
                       full_layers=len(vit.fullatt_block_indexes), projector=False,
                       temporal=recipe.temporal_patch_size, mlp_matrices=3)  # gate, up and down projections


HALF = TorchHalf(QwenAdapter, shapes_config, ensure_tiny_qwen, QwenVisionStages, vision_flops_shape)
