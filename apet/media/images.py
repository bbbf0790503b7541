"""Image loading for every family, without transformers or torch.

Accepts a path, bytes, a PIL image or a numpy array; applies EXIF orientation; converts palette,
greyscale, 16-bit, CMYK and alpha images to RGB (alpha composited on white, as users expect for
screenshots and logos); and turns every decoding failure into an :class:`InputError`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from apet.errors import InputError

MAX_PIXELS = 64_000_000  # decompression-bomb limit (8000 x 8000); PIL's own default is ~89 MP
MAX_FILE_BYTES = 256 << 20

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


UPLOADED = "the uploaded bytes"  # how bytes are named in messages (a repr of the buffer helps nobody)
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class TooManyPixels(InputError):
    """An image over a pixel limit: apet's decompression-bomb guard, raised from the header alone, before
    the pixels are decoded (``pixels`` is None where only a lower bound is known)."""

    def __init__(self, what: str, pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> None:
        self.pixels, self.limit = pixels, limit
        shape = f"{size[0]}x{size[1]} = " if size else ""
        count = f"{shape}{pixels:,} pixels" if pixels is not None else "more pixels than PIL opens"
        super().__init__(f"{what} has {count}, over the {limit:,}-pixel limit",
                         "downscale it first (the model sees at most a few hundred pixels per side)")


def open_lazily(data: bytes, what: str, formats: list[str] | None = None) -> Image.Image:
    """``Image.open`` (reads the header only), with PIL's decompression-bomb refusal turned into
    :class:`TooManyPixels` and PIL's warning below it left to the caller's own, lower limit; every other
    PIL error propagates for the caller to word."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=formats)
        except Image.DecompressionBombError as exc:
            found = _BOMB_PIXELS.search(str(exc))
            raise TooManyPixels(what, int(found.group(1)) if found else None, MAX_PIXELS) from exc


DEMO = "@demo"  # the image shipped with the package, usable wherever an image is


def demo_image_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "demo.png"


def resolve_image(image: ImageInput) -> ImageInput:
    """``@demo`` -> the bundled image; a directory is refused by name (not reported as missing)."""
    if isinstance(image, str) and image == DEMO:
        return demo_image_path()
    if isinstance(image, (str, os.PathLike)) and Path(image).is_dir():
        raise InputError(f"image {image} is a directory, not an image file", "pass one image file (JPEG/PNG/...)")
    return image


def _open(source: ImageInput, name: str | None = None) -> Image.Image:
    source = resolve_image(source)
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray)):
        data, what = bytes(source), name or UPLOADED
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"image {path} does not exist", "check the path passed to --image")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InputError(f"image {path} is larger than {MAX_FILE_BYTES >> 20} MiB", "downscale it first")
        data, what = path.read_bytes(), name or f"image {path}"
    if not data:
        raise InputError(f"{what} is empty (0 bytes)", "pass a JPEG/PNG/WebP file")
    try:
        image = open_lazily(data, what)
        _check_size(image.size, what)
        image.load()  # decode now: truncated files fail here, not later
        return image
    except InputError:
        raise
    except UnidentifiedImageError as exc:
        raise InputError(f"{what} cannot be decoded: it is not an image (no image format recognised in its "
                         f"{len(data):,} bytes)", "pass a JPEG, PNG, WebP or BMP file") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        detail = _BUFFER_REPR.sub("the data", str(exc))
        raise InputError(f"{what} cannot be decoded ({type(exc).__name__}: {detail})",
                         "pass a valid JPEG/PNG/WebP/BMP file (it may be truncated or not an image)") from exc


def _check_size(size: tuple[int, int], what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{what} has zero size ({width}x{height})", "pass an image with pixels")
    if width * height > MAX_PIXELS:
        raise TooManyPixels(what, width * height, MAX_PIXELS, (width, height))


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise InputError(f"image array has shape {array.shape}", "pass HxW, HxWx1, HxWx3 or HxWx4 pixels")
    _check_size((array.shape[1], array.shape[0]), "the image array")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise InputError("image array contains NaN or Inf", "pass finite pixel values")
            scale = 255.0 if array.max() <= 1.0 else 1.0
            array = (array * scale).clip(0, 255).round().astype(np.uint8)
        elif array.dtype == np.uint16:
            array = (array >> 8).astype(np.uint8)
        else:
            array = array.clip(0, 255).astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; every mode made RGB (alpha composited on white)."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF must not reject an otherwise valid image
        pass
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray((array / peak * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageInput, name: str | None = None) -> Image.Image:
    """Any supported input -> an RGB PIL image, or InputError. ``name`` is how messages call the input
    (default: ``image PATH``, or "the uploaded bytes")."""
    image = _open(source, name)
    _check_size(image.size, name or "the image")
    try:
        return to_rgb(image)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"image cannot be converted to RGB ({type(exc).__name__}: {exc})",
                         "re-save it as an 8-bit RGB PNG or JPEG") from exc
