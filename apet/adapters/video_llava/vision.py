"""Video-LLaVA's vision graphs. Video: [B, T, 3, H, W] -> video tower + projector per frame -> ApET per frame with
CLS kept aside -> [B, T·(1 + K), H_llm] and the kept positions. Image (``--media image``): [B, 3, H, W] -> image
tower (CLS dropped, as HF's ``get_image_features``) + projector -> ApET as for one frame -> [B, K, H_llm].

The authors compress after the projector (``encode_videos``), so the projector runs on all 257 tokens
of each frame (unlike LLaVA-1.5, where it may run after selection). Each frame's output is
``[CLS, K tokens in the plan's order]``; with the paper's ``append`` placement that is
``[CLS, 22 merged in descending-error order, 10 basis in FPS order]``. ``keep_index`` holds each row's
position among the frame's 1 + N tokens (0 = CLS, 1 + p = patch p), frame after frame.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from apet.adapters.shared.clip_tower import clip_attention
from apet.compression import Compressed
from apet.graph_ops import take
from apet.modeling.vision import Scope, VisionStages


class VideoLlavaVisionStages(VisionStages):
    input_names = ["pixel_values_videos"]

    def __init__(self, adapter, select: Callable[[torch.Tensor], Compressed]) -> None:
        super().__init__(adapter, select)
        self.select = select
        self.apet_stage1 = Scope(self.select_frames)

    def features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        return self.adapter.vision_features(pixel_values_videos)

    def fast_linears(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        return clip_attention(self.adapter.video_tower())

    def select_frames(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[F, 1 + N, H] -> ([F, 1 + K, H], [F, 1 + K]): the selector sees the N patch tokens only."""
        patches = int(features.shape[1]) - 1  # static per artifact; Gathers, not Slices (apet.graph_ops says why)
        kept = self.select(take(features, 1, 1, patches + 1))
        tokens = torch.cat([take(features, 1, 0, 1), kept.tokens.to(features.dtype)], 1)
        shifted = kept.index + 1  # position among the frame's 1 + N tokens; CLS is 0
        index = torch.cat([take(shifted, 1, 0, 1) * 0, shifted], 1)
        return tokens, index

    def finish(self, tokens: torch.Tensor, index: torch.Tensor,
               pixel_values_videos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frames = int(pixel_values_videos.shape[1])  # static per artifact
        per_request = frames * int(tokens.shape[1])
        return tokens.reshape(-1, per_request, tokens.shape[-1]), index.reshape(-1, per_request)

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        recipe = self.adapter.spec.processor
        return (torch.randn(batch, self.adapter.frames, 3, recipe["crop_height"], recipe["crop_width"],
                            dtype=self.adapter.dtype, device=self.adapter.device),)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"pixel_values_videos": {0: "batch"}, "visual_embeds": {0: "batch"}, "keep_index": {0: "batch"}}


class VideoLlavaImageStages(VisionStages):
    """Images through the image tower. The authors' ``encode_images`` compresses nothing (ratio 1.0 reproduces
    it); a lower ratio compresses an image like one frame (same placement, projected features), which is
    apet's extension, not the paper's."""

    input_names = ["pixel_values"]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.adapter.image_features(pixel_values)

    def fast_linears(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        return clip_attention(self.adapter.image_tower())

    def finish(self, tokens: torch.Tensor, index: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tokens, index

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        recipe = self.adapter.spec.processor
        return (torch.randn(batch, 3, recipe["crop_height"], recipe["crop_width"], dtype=self.adapter.dtype,
                            device=self.adapter.device),)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"pixel_values": {0: "batch"}, "visual_embeds": {0: "batch"}, "keep_index": {0: "batch"}}
