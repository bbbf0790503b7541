"""Video-LLaVA at run time (torch-free): a video -> T uniformly sampled frames -> CLIP pixels
[T, 3, H, W]; the T·(1 + K) kept rows of a request -> one visual span at the ``<video>`` placeholder
(the prompt layout is LLaVA-1.5's). An artifact exported with ``--media image`` reads images exactly as
LLaVA-1.5 does (its processor, unchanged)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from apet.media.video import read_video
from apet.models.family import VisionInputs
from apet.models.llava.processor import LlavaProcessor
from apet.models.shared.clip import preprocess


class VideoLlavaProcessor(LlavaProcessor):
    @property
    def frames(self) -> int:
        return int(self.manifest.model.extra["frames"])

    def frame_pixels(self, video: Any) -> np.ndarray:
        """One video -> float32 [T, 3, H, W]."""
        return np.stack([preprocess(Image.fromarray(frame), self.recipe) for frame in read_video(video, self.frames)])

    def vision_inputs(self, media: Sequence[Any]) -> VisionInputs:
        if self.manifest.model.extra.get("media", "video") == "image":
            return super().vision_inputs(media)
        return VisionInputs({"pixel_values_videos": np.stack([self.frame_pixels(video) for video in media])},
                            items=len(media))
