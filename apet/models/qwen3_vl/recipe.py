"""Qwen3-VL's image recipe (torch-free): Qwen2.5-VL's processor with 16-px patches, mean/std 0.5 and no window
attention, read from the checkpoint's processor files (``processor_settings``) as Hugging Face's processor reads
them; without files (the ``*-shapes`` models) the published ``preprocessor_config.json`` of
Qwen/Qwen3-VL-*-Instruct. Everything else — smart resize, patch order, the ``--pixel-range`` bounds — is
Qwen2.5-VL's (:mod:`apet.models.qwen2_5_vl.preprocess`, :mod:`apet.models.qwen2_5_vl.pixel_range`).
"""

from __future__ import annotations

from typing import Any, Mapping

from apet.models.qwen2_5_vl.pixel_range import CHECKPOINT
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe, recipe_from_settings

# preprocessor_config.json of Qwen/Qwen3-VL-2B/4B/8B-Instruct: 64 .. 16384 merged tokens of 32x32 px
HUB_SETTINGS: dict[str, Any] = {
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}
NO_WINDOWS = 0  # QwenImageRecipe.window_size: every ViT block attends over the whole image


def qwen3_recipe(settings: Mapping[str, Any], pixel_range: str = CHECKPOINT,
                 source: str = "the checkpoint") -> QwenImageRecipe:
    """The recipe of a checkpoint's image-processor ``settings`` with the bounds of ``pixel_range`` (parsed)."""
    return recipe_from_settings(settings or HUB_SETTINGS, NO_WINDOWS, pixel_range, source=source)
