"""The CLIP image recipe (LLaVA-1.5, LLaVA-NeXT tiles, Video-LLaVA frames), torch-free.

Reproduces Hugging Face's CLIP image processor (PIL backend): resize the shortest edge with the
checkpoint's filter, centre crop, rescale, normalise — after padding to a square with the mean
colour when ``image_fit`` is ``pad`` (the original LLaVA-1.5's ``image_aspect_ratio: pad``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from apet.models.shared.hf_files import read_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipRecipe:
    """How an image becomes ``pixel_values`` [3, H, W] (recorded in the manifest as ``model.processor``)."""

    crop_height: int
    crop_width: int
    shortest_edge: int
    resample: int  # PIL resampling filter id (3 = bicubic)
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_center_crop: bool = True
    image_fit: str = "crop"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ClipRecipe":
        return cls(**{**data, "image_mean": tuple(data["image_mean"]), "image_std": tuple(data["image_std"])})

    def with_fit(self, image_fit: str) -> "ClipRecipe":
        return replace(self, image_fit=image_fit)


def processor_settings(path: Path | None, section: str = "image_processor") -> dict[str, Any]:
    """A checkpoint's image-processor settings in either file layout transformers writes (the nested
    ``processor_config.json`` of ``save_pretrained`` or the older ``preprocessor_config.json``)."""
    if path is None:
        return {}
    if (path / "preprocessor_config.json").is_file():
        return read_json(path / "preprocessor_config.json")
    if (path / "processor_config.json").is_file():
        return read_json(path / "processor_config.json").get(section, {})
    return {}


def video_processor_settings(path: Path | None) -> dict[str, Any]:
    """A checkpoint's video-processor settings: ``video_preprocessor_config.json``, the ``video_processor``
    section of a nested ``processor_config.json``, or else the image processor's (older hub files, whose
    image processor also processed videos)."""
    if path is not None and (path / "video_preprocessor_config.json").is_file():
        return read_json(path / "video_preprocessor_config.json")
    if path is not None and (path / "processor_config.json").is_file():
        nested = read_json(path / "processor_config.json").get("video_processor")
        if nested:
            return nested
    return processor_settings(path)


def recipe_from_settings(settings: Mapping[str, Any], image_size: int, image_fit: str = "crop") -> ClipRecipe:
    """CLIP defaults at ``image_size`` for anything the settings do not say (random-init models)."""
    size = settings.get("size", {"shortest_edge": image_size})
    crop = settings.get("crop_size", {"height": image_size, "width": image_size})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    shortest = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else int(size)
    return ClipRecipe(
        crop_height=int(crop["height"]), crop_width=int(crop["width"]), shortest_edge=int(shortest),
        resample=int(settings.get("resample", 3)), rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
        image_mean=tuple(settings.get("image_mean", CLIP_MEAN)), image_std=tuple(settings.get("image_std", CLIP_STD)),
        do_center_crop=bool(settings.get("do_center_crop", True)), image_fit=image_fit,
    )


def _resize_shortest(image: Image.Image, shortest: int, resample: int) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(size, resample=resample)


def _centre_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] centre crop; pads with zeros when the image is smaller (as transformers does)."""
    h, w = array.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), array.shape[2]), dtype=array.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top:top + h, left:left + w] = array
        array, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return array[top:top + height, left:left + width]


def pad_to_square(image: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    """The original LLaVA's ``expand2square``: centre the image on a square of the mean colour
    (each channel ``int(mean * 255)``); the extra rows/columns go after when the margin is odd."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def normalize(array: np.ndarray, recipe: ClipRecipe) -> np.ndarray:
    """uint8 [H, W, 3] -> rescaled, normalised float32 [3, H, W]."""
    pixels = array.astype(np.float32) * np.float32(recipe.rescale_factor)
    mean = np.asarray(recipe.image_mean, dtype=np.float32)
    std = np.asarray(recipe.image_std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1).copy()


def preprocess(image: Image.Image, recipe: ClipRecipe) -> np.ndarray:
    """RGB image -> float32 [3, H, W] pixel values."""
    if recipe.image_fit == "pad":
        image = pad_to_square(image, recipe.image_mean)
    array = np.asarray(_resize_shortest(image, recipe.shortest_edge, recipe.resample), dtype=np.uint8)
    if recipe.do_center_crop:
        array = _centre_crop(array, recipe.crop_height, recipe.crop_width)
    return normalize(array, recipe)
