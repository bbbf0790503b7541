"""InternVL's image recipe, torch-free: an image -> its 448-px tiles (and thumbnail) as normalised pixels.

Reproduces Hugging Face's ``GotOcr2ImageProcessorPil`` as ``InternVLProcessor`` calls it (``crop_to_patches``
on): the RGB image is resized with the checkpoint's filter (bicubic) to the canvas of its grid
(:mod:`apet.models.internvl.tiling`) and cut; the thumbnail is the whole image resized to one tile; each view is
rescaled and normalised with the checkpoint's mean and std (ImageNet's for the InternVL checkpoints). Where
torchvision is installed, transformers picks the processor's torchvision backend instead, whose bicubic resize
differs from PIL's by resampling noise (the tests compare with the PIL backend, to 1e-5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import numpy as np
from PIL import Image

from apet.models.internvl.tiling import Tiling, fewest_views, most_views

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TileRecipe:
    """How an image becomes ``pixel_values`` [views, 3, tile, tile] (``model.processor`` in the manifest)."""

    tile: int
    min_tiles: int
    max_tiles: int  # after --max-tiles
    checkpoint_max_tiles: int  # what the checkpoint's processor allows
    resample: int  # PIL filter id (3 = bicubic)
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TileRecipe":
        return cls(**{**data, "image_mean": tuple(data["image_mean"]), "image_std": tuple(data["image_std"])})

    def with_max_tiles(self, max_tiles: int) -> "TileRecipe":
        return replace(self, max_tiles=max_tiles)

    def tiling(self, size: tuple[int, int]) -> Tiling:
        """The tiles of an image of (height, width)."""
        return Tiling.of(size, self.tile, self.min_tiles, self.max_tiles)

    @property
    def most_views(self) -> int:
        return most_views(self.min_tiles, self.max_tiles)

    @property
    def fewest_views(self) -> int:
        return fewest_views(self.min_tiles, self.max_tiles)

    def summary(self) -> str:
        limit = "" if self.max_tiles == self.checkpoint_max_tiles else \
            f" (--max-tiles; the checkpoint allows {self.checkpoint_max_tiles})"
        if self.max_tiles <= 1:
            return f"one {self.tile}-px tile per image (no tiling){limit}"
        return (f"{self.min_tiles}..{self.max_tiles} {self.tile}-px tiles per image{limit}, plus a thumbnail when "
                f"more than one")


def recipe_from_settings(settings: Mapping[str, Any], image_size: int) -> TileRecipe:
    """The recipe of a checkpoint's image-processor settings (``preprocessor_config.json`` or the
    ``image_processor`` section of ``processor_config.json``); Hugging Face's defaults for what they do not say
    (random-weight models have none). ``crop_to_patches`` is not read: ``InternVLProcessor`` always turns it on."""
    size = settings.get("size") or {"height": image_size, "width": image_size}
    tile = int(size.get("height", image_size)) if isinstance(size, Mapping) else int(size)
    max_tiles = int(settings.get("max_patches", 12))
    return TileRecipe(tile=tile, min_tiles=int(settings.get("min_patches", 1)), max_tiles=max_tiles,
                      checkpoint_max_tiles=max_tiles, resample=int(settings.get("resample", 3)),
                      rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
                      image_mean=tuple(float(m) for m in settings.get("image_mean", IMAGENET_MEAN)),
                      image_std=tuple(float(s) for s in settings.get("image_std", IMAGENET_STD)))


def normalize(image: Image.Image, recipe: TileRecipe) -> np.ndarray:
    """RGB tile -> rescaled, normalised float32 [3, tile, tile]."""
    pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) * np.float32(recipe.rescale_factor)
    mean = np.asarray(recipe.image_mean, dtype=np.float32)
    std = np.asarray(recipe.image_std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1).copy()


def tile_views(image: Image.Image, recipe: TileRecipe) -> tuple[np.ndarray, Tiling]:
    """float32 [views, 3, tile, tile]: the tiles in raster order, then the thumbnail (when there are several)."""
    tiling = recipe.tiling((image.height, image.width))
    side = recipe.tile
    canvas = image.resize(tiling.canvas, resample=recipe.resample)
    views = [canvas.crop(box) for box in tiling.boxes()] if tiling.tiles > 1 else [canvas]
    if tiling.thumbnail:
        views.append(image.resize((side, side), resample=recipe.resample))
    return np.stack([normalize(view, recipe) for view in views]), tiling
