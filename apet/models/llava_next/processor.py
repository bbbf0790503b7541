"""LLaVA-NeXT at run time (torch-free): images -> AnyRes views; per-view kept indices -> one visual span.

The vision graph compresses every view to K1 tokens independently and returns their positions in the
view's patch grid. The span of one image is then (the authors' ``prepare_inputs_labels_for_multimodal_x``,
Hugging Face's ``pack_image_features`` at K1 = N):

1. the base view's K1 tokens in position order (the stage-2 span, at ``image_start``);
2. the tiles' kept tokens placed on the high-resolution grid (tile (i, j), patch (r, c) -> grid row
   i·p + r, column j·p + c) and read in raster order over the unpadded part of the grid: kept tokens that
   fall in padding are dropped, and every unpadded grid row ends with the ``image_newline`` row (kept even
   when the row has no kept token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from apet.errors import ArtifactError
from apet.media.images import load_image
from apet.models.family import Layout, Processor, VisionInputs
from apet.models.llava_next.anyres import Geometry, resized_size
from apet.models.prompt import check_context, prompt_encoder, single_span_layout
from apet.models.shared.clip import ClipRecipe, preprocess

NEWLINE = "image_newline"


@dataclass(frozen=True)
class AnyResRecipe:
    """The CLIP recipe of every view plus the grid pinpoints (``model.processor`` in the manifest)."""

    clip: ClipRecipe
    pinpoints: tuple[tuple[int, int], ...]
    patches: int  # tokens per view side

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AnyResRecipe":
        data = dict(data)
        pinpoints = tuple((int(h), int(w)) for h, w in data.pop("image_grid_pinpoints"))
        patches = int(data.pop("patches_per_side"))
        return cls(ClipRecipe.from_json(data), pinpoints, patches)

    @property
    def tile(self) -> int:
        return self.clip.crop_height

    def geometry(self, size: tuple[int, int]) -> Geometry:
        return Geometry.of(size, self.pinpoints, self.tile, self.patches)


def anyres_views(image: Image.Image, recipe: AnyResRecipe) -> tuple[np.ndarray, Geometry]:
    """float32 [views, 3, S, S]: the base view (the image squashed to a square) then the tiles in raster order."""
    geometry = recipe.geometry((image.height, image.width))
    target_h, target_w = geometry.resolution
    new_h, new_w = resized_size(geometry.size, geometry.resolution)
    canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(image.resize((new_w, new_h),
                                                                         resample=recipe.clip.resample))
    side, tile = recipe.clip.shortest_edge, recipe.tile
    views = [image.resize((side, side), resample=recipe.clip.resample)]
    views += [Image.fromarray(canvas[i:i + tile, j:j + tile]) for i in range(0, target_h, tile)
              for j in range(0, target_w, tile)]
    return np.stack([preprocess(view, recipe.clip) for view in views]), geometry


def image_span(geometry: Geometry, keep_index: np.ndarray, first_row: int, image_id: int,
               newline_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ids) of one image's span; ``keep_index`` is [views, K1] of this image, its embeddings are the
    flattened rows ``first_row ..`` (view-major)."""
    views, k1 = keep_index.shape
    p = geometry.patches
    grid = np.full(geometry.token_grid, -1, dtype=np.int64)
    cols = geometry.grid[1]
    for tile in range(views - 1):
        i, j = divmod(tile, cols)
        r, c = np.divmod(keep_index[1 + tile], p)
        grid[i * p + r, j * p + c] = first_row + (1 + tile) * k1 + np.arange(k1)
    row0, row1, col0, col1 = geometry.bounds()
    rows, ids = [first_row + np.arange(k1)], [np.full(k1, image_id)]
    for line in grid[row0:row1, col0:col1]:
        kept = line[line >= 0]
        rows += [kept, np.array([-1])]
        ids += [np.full(len(kept), image_id), np.array([newline_id])]
    return np.concatenate(rows), np.concatenate(ids)


class LlavaNextProcessor(Processor):
    def __init__(self, artifact_dir: Path | None, manifest: Any) -> None:
        super().__init__(artifact_dir, manifest)
        self.recipe = AnyResRecipe.from_json(manifest.model.processor)
        self.encoder = prompt_encoder(artifact_dir, manifest.model)
        extra = manifest.extra_token_ids()
        if NEWLINE not in extra:
            raise ArtifactError(f"the manifest records no {NEWLINE} embedding row (embeddings.extra_rows)",
                                "re-export the artifact with this apet version")
        self.newline_id = extra[NEWLINE]

    def vision_inputs(self, media: Sequence[Any]) -> VisionInputs:
        views, geometries = zip(*(anyres_views(load_image(image), self.recipe) for image in media))
        return VisionInputs({"pixel_values": np.concatenate(views)}, items=len(media), meta=list(geometries))

    def check_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        k1 = self.manifest.visual_tokens  # every image has at least its base view's K1 tokens
        for prompt in prompts:
            before, after = self.encoder.split(prompt)
            check_context(len(before) + k1 + len(after), k1, max_new_tokens, self.manifest.max_context)

    def layout(self, prompts: Sequence[str], inputs: VisionInputs, keep_index: np.ndarray,
               max_new_tokens: int) -> Layout:
        spans, view = [], 0
        k1, image_id = keep_index.shape[1], self.manifest.model.image_token_id
        for geometry in inputs.meta:
            spans.append(image_span(geometry, keep_index[view:view + geometry.views], view * k1, image_id,
                                    self.newline_id))
            view += geometry.views
        return single_span_layout(self.encoder, prompts, spans, self.manifest.max_context, max_new_tokens)

    def item_keep_index(self, inputs: VisionInputs, keep_index: np.ndarray) -> list[np.ndarray]:
        """[views, K1] per image (base view first)."""
        starts = np.cumsum([0] + [g.views for g in inputs.meta])
        return [keep_index[a:b] for a, b in zip(starts[:-1], starts[1:])]
