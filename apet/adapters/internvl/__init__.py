"""InternVL's torch half (apet/adapters/shared/half.py): checkpoints, random weights at real sizes, the tiny
checkpoint and the vision graph. :mod:`apet.models` reaches it through ``Family.torch_half()`` when export, the
torch backend or a benchmark asks; the device never imports it."""

from __future__ import annotations

from typing import Any

from apet.adapters.internvl.adapter import InternVLAdapter
from apet.adapters.internvl.shapes import shapes_config
from apet.adapters.internvl.tiny import ensure_tiny_internvl
from apet.adapters.internvl.vision import InternVLVisionStages
from apet.adapters.shared.half import TorchHalf
from apet.contracts.specs import VisionShape
from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.internvl.family import AFTER


def vision_flops_shape(adapter: VisionLanguageAdapter) -> Any:
    """InternViT per view (CLS + patches, up to the select layer); the projector counts only where it runs on the
    kept tokens (before-projector placement)."""
    vit = adapter.model.config.vision_config
    layers = adapter.spec.extra["vision_feature_layer"]
    depth = layers if layers >= 0 else vit.num_hidden_layers + 1 + layers
    patches = (int(vit.image_size[0]) // int(vit.patch_size[0])) ** 2
    return VisionShape(tokens=patches + 1, dim=vit.hidden_size, mlp_dim=vit.intermediate_size, layers=depth,
                       patch=int(vit.patch_size[0]), projector=adapter.spec.extra["apet_at"] != AFTER)


HALF = TorchHalf(InternVLAdapter, shapes_config, ensure_tiny_internvl, InternVLVisionStages, vision_flops_shape)
