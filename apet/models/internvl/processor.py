"""InternVL at run time (torch-free): images -> tiles (and thumbnails); per-tile kept indices -> one visual span.

The vision graph compresses every view (tile or thumbnail) to K tokens independently and returns them in
position order; Hugging Face fills the ``<IMG_CONTEXT>`` slots between ``<img>`` and ``</img>`` with the views'
tokens in view order (tiles in raster order, the thumbnail last), so the span of one image is simply its views'
kept rows one after another: K per view, 1-D positions, no learned rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apet.media.images import load_image
from apet.models.family import Layout, Processor, VisionInputs
from apet.models.internvl.preprocess import TileRecipe, tile_views
from apet.models.prompt import check_context, prompt_encoder, single_span_layout


class InternVLProcessor(Processor):
    layout_reads_kept_values = False  # K rows per view, the views' count from the tiling

    def __init__(self, artifact_dir: Path | None, manifest: Any) -> None:
        super().__init__(artifact_dir, manifest)
        self.recipe = TileRecipe.from_json(manifest.model.processor)
        self.encoder = prompt_encoder(artifact_dir, manifest.model)

    def vision_inputs(self, media: Sequence[Any]) -> VisionInputs:
        views, tilings = zip(*(tile_views(load_image(image), self.recipe) for image in media))
        return VisionInputs({"pixel_values": np.concatenate(views)}, items=len(media), meta=list(tilings))

    def check_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> int:
        """The prompts must fit with the fewest views an image can have; returns that prefill length (a lower
        bound: the media decide the views, and the layout checks the exact length)."""
        k = self.manifest.visual_tokens
        fewest = self.recipe.fewest_views * k
        longest = 0
        for prompt in prompts:
            before, after = self.encoder.split(prompt)
            length = len(before) + fewest + len(after)
            check_context(length, fewest, max_new_tokens, self.manifest.max_context)
            longest = max(longest, length)
        return longest

    def layout(self, prompts: Sequence[str], inputs: VisionInputs, keep_index: np.ndarray,
               max_new_tokens: int) -> Layout:
        k, image_id = keep_index.shape[1], self.manifest.model.image_token_id
        spans, view = [], 0
        for tiling in inputs.meta:
            rows = np.arange(view * k, (view + tiling.views) * k)
            spans.append((rows, np.full(len(rows), image_id)))
            view += tiling.views
        return single_span_layout(self.encoder, prompts, spans, self.manifest.max_context, max_new_tokens)

    def item_keep_index(self, inputs: VisionInputs, keep_index: np.ndarray) -> list[np.ndarray]:
        """[views, K] per image (tiles in raster order, the thumbnail last)."""
        starts = np.cumsum([0] + [t.views for t in inputs.meta])
        return [keep_index[a:b] for a, b in zip(starts[:-1], starts[1:])]
