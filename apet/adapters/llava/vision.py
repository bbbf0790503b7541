"""LLaVA-1.5's vision graph: one image per request through CLIP -> ApET stage 1 -> projector."""

from __future__ import annotations

from apet.adapters.shared.clip_tower import ClipProjectorStages


class LlavaVisionStages(ClipProjectorStages):
    axis = "batch"
