"""LLaVA-1.5 at run time (torch-free): images -> CLIP pixels; K1 kept tokens per image -> one visual span."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apet.media.images import load_image
from apet.models.family import Layout, Processor, VisionInputs
from apet.models.prompt import check_context, prompt_encoder, single_span_layout
from apet.models.shared.clip import ClipRecipe, preprocess


class LlavaProcessor(Processor):
    def __init__(self, artifact_dir: Path | None, manifest: Any) -> None:
        super().__init__(artifact_dir, manifest)
        self.recipe = ClipRecipe.from_json(manifest.model.processor)
        self.encoder = prompt_encoder(artifact_dir, manifest.model)

    def vision_inputs(self, media: Sequence[Any]) -> VisionInputs:
        pixels = np.stack([preprocess(load_image(image), self.recipe) for image in media])
        return VisionInputs({"pixel_values": pixels}, items=len(media))

    def check_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> int:
        k1, longest = self.manifest.visual_tokens, 0
        for prompt in prompts:
            before, after = self.encoder.split(prompt)
            longest = max(longest, len(before) + k1 + len(after))
            check_context(longest, k1, max_new_tokens, self.manifest.max_context)
        return longest

    def layout(self, prompts: Sequence[str], inputs: VisionInputs, keep_index: np.ndarray,
               max_new_tokens: int) -> Layout:
        k1, image_id = keep_index.shape[1], self.manifest.model.image_token_id
        spans = [(np.arange(b * k1, (b + 1) * k1), np.full(k1, image_id)) for b in range(len(prompts))]
        return single_span_layout(self.encoder, prompts, spans, self.manifest.max_context, max_new_tokens)
