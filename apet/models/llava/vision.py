"""LLaVA-1.5's vision graph: CLIP tower to the select layer -> ApET stage 1 -> projector on the K1 kept tokens.

The projector runs on the kept tokens only: it is per-token, so this equals the reference's
project-then-select at K1/N of the cost.
"""

from __future__ import annotations

import torch

from apet.models.vision import VisionStages


class LlavaVisionStages(VisionStages):
    input_names = ["pixel_values"]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.adapter.vision_features(pixel_values)

    def finish(self, tokens: torch.Tensor, index: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adapter.project(tokens), index

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        recipe = self.adapter.spec.processor
        return (torch.randn(batch, 3, recipe["crop_height"], recipe["crop_width"], dtype=self.adapter.dtype,
                            device=self.adapter.device),)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"pixel_values": {0: "batch"}, "visual_embeds": {0: "batch"}, "keep_index": {0: "batch"}}
