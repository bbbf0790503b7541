"""InternVL3 / InternVL3.5 (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints): facts and factories
(torch-free import).

An image becomes up to ``max_tiles`` 448-px tiles on the grid closest to its aspect ratio, plus a thumbnail
(:mod:`~apet.models.internvl.tiling`); each view goes through InternViT, a 0.5 pixel shuffle (256 tokens of
4x the ViT width) and the MLP projector. ApET runs once per view, like LLaVA-NeXT's views (docs/algorithm.md):
``--ratio r`` keeps round8(r·256) of every view, ``--tokens K`` exactly K; one stage. Where it runs is an
export option, ``--apet-at``: on the projector's output (default, the LLM space, as the authors do for
Qwen2.5-VL's merger, the same shuffle-then-MLP connector) or on its input (as for LLaVA's projector). The
language model is Qwen2.5 (InternVL3) or Qwen3 with q/k norm (InternVL3.5); ``--max-tiles`` bounds the tiles
per image (smaller vision profiles and contexts).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from apet.errors import UsageError
from apet.models.family import Family, FamilyOption, Processor
from apet.models.shared.options import prompt_template_option

if TYPE_CHECKING:
    from apet.manifest import Manifest
    from apet.models.internvl.preprocess import TileRecipe

TYPICAL_IMAGE = (640, 480)  # (width, height): profiles' opt shapes and typical budgets
AFTER, BEFORE = "after-projector", "before-projector"


def _positive(value: int) -> int:
    if value < 1:
        raise UsageError(f"--max-tiles {value} is not a positive number of tiles",
                         "pass the most 448-px tiles per image, e.g. --max-tiles 6 (the thumbnail is extra)")
    return value


# applied in this order through the adapter's set_max_tiles / set_apet_at / set_prompt_template
OPTIONS = (
    FamilyOption("--max-tiles", "most tiles per image (the thumbnail is extra); sizes the vision profiles and "
                 "visual tokens", parse=_positive, metavar="N", kind=int,
                 detail="default the checkpoint's max_patches, 12 on the hub checkpoints"),
    FamilyOption("--apet-at", "where ApET runs in each tile's path: after-projector (LLM space) or "
                 "before-projector (the pixel-shuffled ViT features; the projector then runs on the kept tokens)",
                 default=AFTER, choices=(AFTER, BEFORE)),
    prompt_template_option("internvl_chat (default: the checkpoint's own chat template, rendered)"),
)


def _recipe(manifest: "Manifest") -> "TileRecipe":
    from apet.models.internvl.preprocess import TileRecipe

    return TileRecipe.from_json(manifest.model.processor)


class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    aliases = {"internvl3-1b": "OpenGVLab/InternVL3-1B-hf", "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
               "internvl3-8b": "OpenGVLab/InternVL3-8B-hf", "internvl3.5-1b": "OpenGVLab/InternVL3_5-1B-HF",
               "internvl3.5-2b": "OpenGVLab/InternVL3_5-2B-HF", "internvl3.5-8b": "OpenGVLab/InternVL3_5-8B-HF"}
    shapes = ("internvl3.5-8b-shapes",)
    tiny = "tiny-internvl"
    stage1_placement = "mask"
    max_stages = 1
    export_options = OPTIONS

    def processor(self, artifact_dir: Path | None, manifest: "Manifest") -> Processor:
        from apet.models.internvl.processor import InternVLProcessor

        return InternVLProcessor(artifact_dir, manifest)

    # -- budgets and profiles ----------------------------------------------------------------------
    def max_visual_tokens(self, manifest: "Manifest") -> int:
        return _recipe(manifest).most_views * manifest.visual_tokens

    def typical_visual_tokens(self, manifest: "Manifest") -> int:
        width, height = TYPICAL_IMAGE
        return _recipe(manifest).tiling((height, width)).views * manifest.visual_tokens

    def vision_dims(self, manifest: "Manifest", max_batch: int) -> dict[str, tuple[int, int, int]]:
        recipe = _recipe(manifest)
        width, height = TYPICAL_IMAGE
        return {"views": (recipe.fewest_views, recipe.tiling((height, width)).views, max_batch * recipe.most_views)}

    def visual_summary(self, manifest: "Manifest") -> str:
        recipe = _recipe(manifest)
        where = manifest.model.extra.get("apet_at", AFTER)
        views = f"{recipe.max_tiles} tiles + thumbnail" if recipe.most_views > 1 else "one tile, no thumbnail"
        return (f"up to {self.max_visual_tokens(manifest)} per image: {manifest.visual_tokens} per view x up to "
                f"{recipe.most_views} views ({views}; ApET {where.replace('-', ' ')})")

    def preprocessing_summary(self, manifest: "Manifest") -> str:
        return _recipe(manifest).summary()
