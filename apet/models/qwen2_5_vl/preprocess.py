"""Qwen2.5-VL images -> flattened patches, torch-free (the Hugging Face processor cannot be built here).

``Qwen2_5_VLProcessor`` needs torchvision for its video half, which apet does not depend on, so the
checkpoint's image-processor settings are read from either file layout transformers writes (the
nested ``processor_config.json`` of ``save_pretrained``, or the older ``preprocessor_config.json``)
and ``Qwen2VLImageProcessor``'s PIL path is reproduced: ``smart_resize`` to multiples of
patch·merge (28 px) within [min_pixels, max_pixels], bicubic resize, rescale and normalise, then
the patchify that yields ``pixel_values`` [N, 3·2·14·14 = 1176] in 2x2-merge-block raster order
with ``image_grid_thw`` = (1, H/14, W/14).

The pixel bounds default to what the authors evaluate with (256·28² … 2048·28², their
``model_vqa_loader.py``), not to the checkpoint's (3136 … 12845056); ``apet-export --pixel-range``
picks the checkpoint's or other bounds (:mod:`~apet.models.qwen2_5_vl.pixel_range`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from apet.errors import InputError, UsageError
from apet.models.qwen2_5_vl.pixel_range import AUTHORS, pixel_bounds
from apet.models.shared.clip import CLIP_MEAN, CLIP_STD
from apet.models.shared.hf_files import read_json

AUTHORS_MIN_PIXELS = 256 * 28 * 28
AUTHORS_MAX_PIXELS = 2048 * 28 * 28
MAX_ASPECT = 200  # smart_resize refuses more extreme aspect ratios


@dataclass(frozen=True)
class QwenImageRecipe:
    """How an image becomes patches (recorded in the manifest as ``model.processor``)."""

    min_pixels: int = AUTHORS_MIN_PIXELS
    max_pixels: int = AUTHORS_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    window_size: int = 112  # the ViT's attention window in pixels (vision_config.window_size); 0: none (Qwen3-VL)
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    pixel_range: str = AUTHORS  # the --pixel-range the bounds came from (manifests before it: the authors')

    @property
    def factor(self) -> int:
        """Image sides are multiples of this many pixels (one merged token)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def max_tokens(self) -> int:
        """The most merged tokens (LLM visual tokens) one image can have."""
        return self.max_pixels // (self.factor * self.factor)

    @property
    def min_tokens(self) -> int:
        """The fewest merged tokens one image can have."""
        return -(-self.min_pixels // (self.factor * self.factor))

    def range_summary(self) -> str:
        """The pixel range for ``apet inspect``: its name and the merged-token bounds the processor keeps to."""
        return (f"pixel range {self.pixel_range}: {self.min_tokens}..{self.max_tokens} merged tokens per image "
                f"({self.min_pixels}..{self.max_pixels} px)")

    def with_min_tokens(self, tokens: int) -> "QwenImageRecipe":
        """Raise min_pixels so every image has at least ``tokens`` merged tokens (a fixed budget K)."""
        return replace(self, min_pixels=max(self.min_pixels, tokens * self.factor * self.factor))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "QwenImageRecipe":
        return cls(**{**data, "image_mean": tuple(data["image_mean"]), "image_std": tuple(data["image_std"])})


def processor_settings(path: Path | None) -> dict[str, Any]:
    """The image-processor settings in either layout (nested ``processor_config.json`` wins when both exist,
    as ``save_pretrained`` of transformers 5 writes it)."""
    if path is None:
        return {}
    nested = Path(path) / "processor_config.json"
    if nested.is_file():
        settings = read_json(nested).get("image_processor")
        if isinstance(settings, dict):
            return settings
    older = Path(path) / "preprocessor_config.json"
    return read_json(older) if older.is_file() else {}


def recipe_from_settings(settings: Mapping[str, Any], window_size: int, pixel_range: str = AUTHORS,
                         source: str = "the checkpoint") -> QwenImageRecipe:
    """The checkpoint's patch geometry and normalisation, with the pixel bounds of ``pixel_range`` (a parsed
    ``--pixel-range`` value; default the authors')."""
    recipe = QwenImageRecipe(
        patch_size=int(settings.get("patch_size", 14)),
        temporal_patch_size=int(settings.get("temporal_patch_size", 2)),
        merge_size=int(settings.get("merge_size", 2)), window_size=int(window_size),
        resample=int(settings.get("resample", 3)), rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
        image_mean=tuple(settings.get("image_mean", CLIP_MEAN)), image_std=tuple(settings.get("image_std", CLIP_STD)),
        pixel_range=pixel_range,
    )
    low, high = pixel_bounds(pixel_range, settings, recipe.factor, source)
    if high < recipe.factor * recipe.factor:
        raise UsageError(f"{source}'s preprocessor config has max_pixels {high}, less than one merged token "
                         f"({recipe.factor}x{recipe.factor} px)", "fix the file, or pass --pixel-range authors")
    return replace(recipe, min_pixels=low, max_pixels=high)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Hugging Face's ``smart_resize``: sides to multiples of ``factor`` (Python's round), total pixels
    within [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(f"the image is {width}x{height}, an aspect ratio above {MAX_ASPECT}",
                         "crop it to a less extreme aspect ratio")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patch_grid(width: int, height: int, recipe: QwenImageRecipe) -> tuple[int, int]:
    """(rows, columns) of 14-px patches an image of this size becomes."""
    h, w = smart_resize(height, width, recipe.factor, recipe.min_pixels, recipe.max_pixels)
    return h // recipe.patch_size, w // recipe.patch_size


def patchify(pixels: np.ndarray, recipe: QwenImageRecipe) -> np.ndarray:
    """[3, H, W] float32 -> [H/14 · W/14, 1176], patches of one 2x2 merge block consecutive, blocks in
    raster order; the still image is repeated over the temporal patch (as the reference does)."""
    channels, height, width = pixels.shape
    ps, m, tp = recipe.patch_size, recipe.merge_size, recipe.temporal_patch_size
    grid_h, grid_w = height // ps, width // ps
    patches = pixels.reshape(channels, grid_h // m, m, ps, grid_w // m, m, ps)
    patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], tp, *patches.shape[5:]))
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * tp * ps * ps), dtype=np.float32)


def preprocess(image: Image.Image, recipe: QwenImageRecipe) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> (patches [N, 1176] float32, (grid rows, grid columns))."""
    width, height = image.size
    h, w = smart_resize(height, width, recipe.factor, recipe.min_pixels, recipe.max_pixels)
    array = np.asarray(image.convert("RGB").resize((w, h), resample=recipe.resample), dtype=np.uint8)
    pixels = array.astype(np.float32) * np.float32(recipe.rescale_factor)
    mean = np.asarray(recipe.image_mean, dtype=np.float32)
    std = np.asarray(recipe.image_std, dtype=np.float32)
    pixels = ((pixels - mean) / std).transpose(2, 0, 1)
    return patchify(pixels, recipe), (h // recipe.patch_size, w // recipe.patch_size)
