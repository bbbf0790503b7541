"""LLaVA-NeXT / v1.6 (``LlavaNextForConditionalGeneration``, AnyRes): facts and factories (torch-free import).

How the authors apply ApET to LLaVA-NeXT (docs/algorithm.md, "Per family"):
stage 1 compresses each view (base and every tile) independently to K1 (paper: 192 of 576, k = 10); the
kept tile tokens are laid out on the high-resolution grid, unpadded, with ``image_newline`` ending every
row (:mod:`apet.models.llava_next.processor`); stage 2 after layer 15 compresses only the base view's K1
tokens, which come first in the span (paper: 64). ``--ratio r`` therefore sizes K1 and K2 against the
576 tokens of one view, exactly as for LLaVA-1.5; the visual tokens of a request depend on the image.

Where the authors' copy and Hugging Face differ, we follow Hugging Face (the checkpoints' owner since
v1.6-hf): ``unpad_image`` rounds the unpadded extent (the authors truncate; they differ only when
the extent is within 1e-7 of an integer from below).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from apet.models.family import Family, FamilyOption, Layout, Processor, VisionInputs
from apet.models.llava_next import anyres
from apet.models.shared.options import prompt_template_option

if TYPE_CHECKING:
    from apet.manifest import Manifest


def _grid(manifest: "Manifest") -> tuple[list, int, int]:
    """(allowed pinpoints, tile side, tokens per view side) of an artifact."""
    processor = manifest.model.processor
    return processor["image_grid_pinpoints"], int(processor["crop_height"]), int(processor["patches_per_side"])


class LlavaNextFamily(Family):
    name = "llava-next"
    model_types = ("llava_next",)
    aliases = {"llava-next": "llava-hf/llava-v1.6-vicuna-7b-hf",
               "llava-next-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
               "llava-next-vicuna-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
               "llava-next-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
               "llava-next-34b": "llava-hf/llava-v1.6-34b-hf"}
    shapes = ("llava-next-shapes",)
    tiny = "tiny-llava-next"
    stage1_placement = "mask"
    export_options = (
        FamilyOption("--max-views", "most views (base + AnyRes tiles) per image; sizes the vision profiles and "
                     "visual tokens", kind=int, detail="default: the checkpoint's largest grid pinpoint"),
        prompt_template_option("vicuna_v1 (default for Vicuna), hf, mistral_instruct, chatml_direct (defaults for "
                               "Mistral / 34B)"),
    )

    def processor(self, artifact_dir: Path | None, manifest: "Manifest") -> Processor:
        from apet.models.llava_next.processor import LlavaNextProcessor

        return LlavaNextProcessor(artifact_dir, manifest)

    def max_visual_tokens(self, manifest: "Manifest") -> int:
        pinpoints, tile, patches = _grid(manifest)
        return anyres.max_visual_tokens(pinpoints, tile, patches, manifest.visual_tokens)

    def vision_dims(self, manifest: "Manifest", max_batch: int) -> dict[str, tuple[int, int, int]]:
        pinpoints, tile, _ = _grid(manifest)
        most = anyres.most_views(pinpoints, tile)
        return {"views": (anyres.fewest_views(pinpoints, tile), most, max_batch * most)}

    def visual_summary(self, manifest: "Manifest") -> str:
        pinpoints, tile, patches = _grid(manifest)
        views = anyres.most_views(pinpoints, tile)
        return (f"up to {self.max_visual_tokens(manifest)} per image: {manifest.visual_tokens} per view x up to "
                f"{views} views (AnyRes grids {pinpoints}, {tile}-px tiles) + one image_newline per grid row")

    def hf_generate_inputs(self, inputs: VisionInputs, layout: Layout) -> dict[str, np.ndarray]:
        """Views padded to [images, max views, 3, S, S], the original sizes, and the ids with every visual slot
        (newlines included) set to the image token, as Hugging Face's LlavaNextProcessor writes them."""
        pixels, geometries = inputs.arrays["pixel_values"], inputs.meta
        most = max(g.views for g in geometries)
        padded = np.zeros((len(geometries), most, *pixels.shape[1:]), dtype=pixels.dtype)
        start = 0
        for b, geometry in enumerate(geometries):
            padded[b, :geometry.views] = pixels[start:start + geometry.views]
            start += geometry.views
        ids = layout.token_ids.copy()
        image_id = ids[layout.visual_rows >= 0][0]
        for b, first in enumerate(layout.image_start):
            ids[b, first:first + layout.visual_tokens[b]] = image_id
        return {"pixel_values": padded, "image_sizes": np.array([g.size for g in geometries], dtype=np.int64),
                "input_ids": ids}
