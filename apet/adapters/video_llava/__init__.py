"""Video-LLaVA's torch half: loading checkpoints, random weights at real sizes, the seeded tiny
checkpoint, the vision graph and its FLOP shape. :class:`apet.models.video_llava.family` reaches these through
``Family.torch_half()`` when export, the torch backend or a benchmark asks (the device never imports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.family import Selector


def load(path: Path, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
    from apet.adapters.video_llava.adapter import VideoLlavaAdapter

    return VideoLlavaAdapter.load(path, dtype=dtype, device=device)


def random_init(shape_name: str, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
    from apet.adapters.video_llava.adapter import VideoLlavaAdapter
    from apet.adapters.video_llava.shapes import shapes_config

    return VideoLlavaAdapter.random_init(shapes_config(shape_name), dtype=dtype, device=device)


def tiny_checkpoint() -> Path:
    from apet.adapters.video_llava.tiny import ensure_tiny_video_llava

    return ensure_tiny_video_llava()


def vision_stages(adapter: "VisionLanguageAdapter", select: Selector) -> Any:
    from apet.adapters.video_llava.vision import VideoLlavaImageStages, VideoLlavaVisionStages

    stages = VideoLlavaImageStages if adapter.spec.extra.get("media") == "image" else VideoLlavaVisionStages
    return stages(adapter, select)


def vision_flops_shape(adapter: "VisionLanguageAdapter") -> Any:
    from apet.contracts.specs import VisionShape

    tower = adapter.model.config.vision_config
    select = adapter.spec.extra.get("vision_feature_layer", -1)
    depth = select if select >= 0 else tower.num_hidden_layers + 1 + select
    return VisionShape(tokens=adapter.spec.n_tokens + 1, dim=tower.hidden_size, mlp_dim=tower.intermediate_size,
                       layers=depth, patch=tower.patch_size)
