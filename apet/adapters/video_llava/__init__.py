"""Video-LLaVA's torch half (apet/adapters/shared/half.py): checkpoints, random weights at real sizes, the tiny
checkpoint and the vision graph. :mod:`apet.models` reaches it through ``Family.torch_half()`` when export, the
torch backend or a benchmark asks; the device never imports it."""

from __future__ import annotations

from typing import Any

from apet.adapters.shared.half import Selector, TorchHalf
from apet.adapters.video_llava.adapter import VideoLlavaAdapter
from apet.adapters.video_llava.shapes import shapes_config
from apet.adapters.video_llava.tiny import ensure_tiny_video_llava
from apet.adapters.video_llava.vision import VideoLlavaImageStages, VideoLlavaVisionStages
from apet.contracts.specs import VisionShape
from apet.modeling.adapter import VisionLanguageAdapter


def vision_stages(adapter: VisionLanguageAdapter, select: Selector) -> Any:
    """The artifact's medium decides the tower: the video tower per frame, or the image tower (--media image)."""
    stages = VideoLlavaImageStages if adapter.spec.extra.get("media") == "image" else VideoLlavaVisionStages
    return stages(adapter, select)


def vision_flops_shape(adapter: VisionLanguageAdapter) -> Any:
    tower = adapter.model.config.vision_config
    select = adapter.spec.extra.get("vision_feature_layer", -1)
    depth = select if select >= 0 else tower.num_hidden_layers + 1 + select
    return VisionShape(tokens=adapter.spec.n_tokens + 1, dim=tower.hidden_size, mlp_dim=tower.intermediate_size,
                       layers=depth, patch=tower.patch_size)


HALF = TorchHalf(VideoLlavaAdapter, shapes_config, ensure_tiny_video_llava, vision_stages, vision_flops_shape)
