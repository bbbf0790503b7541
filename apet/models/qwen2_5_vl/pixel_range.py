"""``--pixel-range``: the image sizes Qwen2.5-VL's processor produces, in merged tokens (28x28 px each), torch-free.

* ``authors`` (Qwen2.5-VL's default: fidelity to the paper's numbers): 256..2048 merged tokens, the bounds
  of the authors' evaluation (their ``model_vqa_loader.py``);
* ``checkpoint``: the checkpoint's own ``min_pixels`` / ``max_pixels`` (its preprocessor config), read as
  Hugging Face's ``Qwen2VLImageProcessor`` reads them, so a fine-tuned checkpoint with its own range gets the
  inputs it gets in Hugging Face;
* ``MIN:MAX``: bounds of your own, in merged tokens.

The resolved name and pixel bounds are recorded in the manifest's ``model.processor``
(:class:`~apet.models.qwen2_5_vl.preprocess.QwenImageRecipe`), which the processor of every backend,
``apet-eval`` and the engine profiles (:func:`~apet.models.qwen2_5_vl.geometry.grid_bounds`) read.
The option is declared by the family (:class:`~apet.models.family.FamilyOption`); another family with
the same processor declares it through :func:`pixel_range_option` with its own default.
"""

from __future__ import annotations

from typing import Any, Mapping

from apet.errors import UsageError
from apet.models.family import FamilyOption

FLAG = "--pixel-range"
AUTHORS = "authors"
CHECKPOINT = "checkpoint"
NAMED = (AUTHORS, CHECKPOINT)
AUTHORS_TOKENS = (256, 2048)
# 16384 merged tokens = 12,845,056 px, the largest range Qwen2.5-VL checkpoints declare (their
# preprocessor_config.json max_pixels); beyond it one image alone outgrows the LLM's usual context
MAX_TOKENS = 16384
# Qwen2VLImageProcessor's own size when a checkpoint's preprocessor config names none (shortest/longest edge)
HF_DEFAULT_PIXELS = (56 * 56, 28 * 28 * 1280)

HELP = ("image sizes in merged tokens (a 2x2 block of patches: 28x28 px for Qwen2.5-VL, 32x32 px for Qwen3-VL) for "
        "dynamic-resolution families: authors = 256:2048, the "
        "range the ApET authors evaluate with; checkpoint = the checkpoint's min_pixels/max_pixels (its "
        f"preprocessor config, as Hugging Face's processor uses them); MIN:MAX = your own, 1 <= MIN <= MAX <= "
        f"{MAX_TOKENS}")


def _fix() -> str:
    return (f"pass {FLAG} authors, {FLAG} checkpoint or {FLAG} MIN:MAX in merged tokens with 1 <= MIN <= MAX <= "
            f"{MAX_TOKENS} (e.g. {FLAG} {AUTHORS_TOKENS[0]}:{AUTHORS_TOKENS[1]})")


def parse_pixel_range(value: str) -> str:
    """``authors`` | ``checkpoint`` | ``MIN:MAX`` (normalised, e.g. ``" 64 : 512"`` -> ``"64:512"``); UsageError
    naming the flag, the value and the fix for anything else."""
    text = str(value).strip()
    if text.lower() in NAMED:
        return text.lower()
    low, high = token_bounds(text)
    return f"{low}:{high}"


def token_bounds(value: str) -> tuple[int, int]:
    """(MIN, MAX) merged tokens of a ``MIN:MAX`` value, checked."""
    parts = str(value).split(":")
    try:
        if len(parts) != 2:
            raise ValueError(value)
        low, high = (int(p.strip()) for p in parts)
    except ValueError:
        raise UsageError(f"{FLAG} {value!r} is neither authors, checkpoint nor MIN:MAX (two integers)", _fix()) \
            from None
    if not 1 <= low <= high <= MAX_TOKENS:
        raise UsageError(f"{FLAG} {value!r} is outside 1 <= MIN <= MAX <= {MAX_TOKENS} merged tokens", _fix())
    return low, high


def checkpoint_pixels(settings: Mapping[str, Any], source: str = "the checkpoint") -> tuple[int, int]:
    """(min_pixels, max_pixels) as ``Qwen2VLImageProcessor`` takes them: ``min_pixels`` / ``max_pixels`` override
    ``size``'s ``shortest_edge`` / ``longest_edge``; the class's own size where the file names neither."""
    size = settings.get("size") if isinstance(settings.get("size"), Mapping) else {}
    low = settings.get("min_pixels", size.get("shortest_edge", HF_DEFAULT_PIXELS[0]))
    high = settings.get("max_pixels", size.get("longest_edge", HF_DEFAULT_PIXELS[1]))
    try:
        low, high = int(low), int(high)
    except (TypeError, ValueError):
        raise UsageError(f"{source}'s preprocessor config has min_pixels {low!r} / max_pixels {high!r}, not integers",
                         f"fix the file, or pass {FLAG} {AUTHORS} or {FLAG} MIN:MAX") from None
    if not 0 < low <= high:
        raise UsageError(f"{source}'s preprocessor config has min_pixels {low} and max_pixels {high} (need "
                         "0 < min_pixels <= max_pixels)", f"fix the file, or pass {FLAG} {AUTHORS} or {FLAG} MIN:MAX")
    return low, high


def pixel_bounds(value: str, settings: Mapping[str, Any], factor: int, source: str = "the checkpoint") \
        -> tuple[int, int]:
    """(min_pixels, max_pixels) of a parsed ``--pixel-range`` value; ``factor`` is the side of one merged token
    in pixels (patch · merge = 28)."""
    if value == AUTHORS:
        low, high = AUTHORS_TOKENS
    elif value == CHECKPOINT:
        return checkpoint_pixels(settings, source)
    else:
        low, high = token_bounds(value)
    return low * factor * factor, high * factor * factor


def pixel_range_option(default: str) -> FamilyOption:
    """The ``--pixel-range`` declaration with a family's own default (Qwen2.5-VL: ``authors``)."""
    return FamilyOption(FLAG, HELP, default=parse_pixel_range(default), parse=parse_pixel_range,
                        metavar="authors|checkpoint|MIN:MAX")
