"""LLaVA-1.5 at run time (torch-free): images -> CLIP pixels; K1 kept tokens per image -> one visual span."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apet.media.images import load_image
from apet.models.family import Layout, Processor, VisionInputs
from apet.models.prompt import check_context, prompt_encoder, single_span_layout
from apet.models.registry import family_of
from apet.models.shared.clip import ClipRecipe, preprocess


class LlavaProcessor(Processor):
    layout_reads_kept_values = False  # one span of K rows per image, wherever they came from

    def __init__(self, artifact_dir: Path | None, manifest: Any) -> None:
        super().__init__(artifact_dir, manifest)
        self.recipe = ClipRecipe.from_json(manifest.model.processor)
        self.encoder = prompt_encoder(artifact_dir, manifest.model)

    def vision_inputs(self, media: Sequence[Any]) -> VisionInputs:
        pixels = np.stack([preprocess(load_image(image), self.recipe) for image in media])
        return VisionInputs({"pixel_values": pixels}, items=len(media))

    def check_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> int:
        visual, longest = family_of(self.manifest).max_visual_tokens(self.manifest), 0
        for prompt in prompts:
            before, after = self.encoder.split(prompt)
            longest = max(longest, len(before) + visual + len(after))
            check_context(longest, visual, max_new_tokens, self.manifest.max_context)
        return longest

    def layout(self, prompts: Sequence[str], inputs: VisionInputs, keep_index: np.ndarray,
               max_new_tokens: int) -> Layout:
        rows, image_id = keep_index.shape[1], self.manifest.model.image_token_id  # visual rows per request
        spans = [(np.arange(b * rows, (b + 1) * rows), np.full(rows, image_id)) for b in range(len(prompts))]
        return single_span_layout(self.encoder, prompts, spans, self.manifest.max_context, max_new_tokens)
