"""LLaVA-NeXT's vision graph: every view of every image through CLIP -> ApET stage 1 (each view to K1,
independently, as the authors' ``encode_images`` does on the concatenated views) -> projector."""

from __future__ import annotations

from apet.adapters.shared.clip_tower import ClipProjectorStages


class LlavaNextVisionStages(ClipProjectorStages):
    axis = "views"
