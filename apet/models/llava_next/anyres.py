"""AnyRes geometry of LLaVA-NeXT, torch-free: which grid an image gets, its views, and which cells of the
high-resolution feature grid survive unpadding.

An image of (height, width) is resized (aspect kept) into the best of the checkpoint's grid pinpoints,
padded with black to it and cut into square tiles in raster order; the base view is the whole image
squashed to one tile. Every view yields ``patches x patches`` tokens. The tiles' tokens form a
(rows·patches) x (cols·patches) grid, from which unpadding removes the rows (or columns) that only
cover padding. Formulas follow transformers' ``select_best_resolution``, ``get_patch_output_size``
and ``unpad_image`` (which rounds where the authors' copy truncates, see the family docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Pinpoints = Sequence[Sequence[int]]  # (height, width) pairs, multiples of the tile size


def select_best_resolution(size: tuple[int, int], pinpoints: Pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most of the image's pixels, then wastes the fewest."""
    height, width = size
    best, most, least_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > most or (effective == most and waste < least_waste):
            best, most, least_waste = (int(h), int(w)), effective, waste
    if best is None:
        raise ValueError("no grid pinpoints")
    return best


def resized_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into ``target`` with its aspect ratio kept (ceil, clamped)."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_bounds(size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the feature grid of shape ``grid`` that cover the image, not the padding
    (transformers' ``unpad_image``: the new extent is rounded, the padding is split evenly by floor)."""
    height, width = size
    rows, cols = grid
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad


@dataclass(frozen=True)
class Geometry:
    """AnyRes layout of one image: original size, the chosen resolution, its tile grid and token grid."""

    size: tuple[int, int]  # original (height, width)
    resolution: tuple[int, int]  # best pinpoint (height, width)
    tile: int  # tile side in pixels
    patches: int  # tokens per tile side

    @classmethod
    def of(cls, size: tuple[int, int], pinpoints: Pinpoints, tile: int, patches: int) -> "Geometry":
        return cls(size, select_best_resolution(size, pinpoints), tile, patches)

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles (rows, cols)."""
        return self.resolution[0] // self.tile, self.resolution[1] // self.tile

    @property
    def views(self) -> int:
        rows, cols = self.grid
        return 1 + rows * cols

    @property
    def token_grid(self) -> tuple[int, int]:
        rows, cols = self.grid
        return rows * self.patches, cols * self.patches

    def bounds(self) -> tuple[int, int, int, int]:
        return unpad_bounds(self.size, self.token_grid)


def tiles_of(pinpoint: Sequence[int], tile: int) -> int:
    return (int(pinpoint[0]) // tile) * (int(pinpoint[1]) // tile)


def allowed_pinpoints(pinpoints: Pinpoints, tile: int, max_views: int | None) -> list[list[int]]:
    """The pinpoints whose grids need at most ``max_views`` views (base + tiles); all when None."""
    return [[int(h), int(w)] for h, w in pinpoints if max_views is None or 1 + tiles_of((h, w), tile) <= max_views]


def most_views(pinpoints: Pinpoints, tile: int) -> int:
    return 1 + max(tiles_of(p, tile) for p in pinpoints)


def fewest_views(pinpoints: Pinpoints, tile: int) -> int:
    return 1 + min(tiles_of(p, tile) for p in pinpoints)


def max_visual_tokens(pinpoints: Pinpoints, tile: int, patches: int, keep: int) -> int:
    """The most visual tokens one image can need: each view keeps ``keep``; the largest grid with no padding
    (an image of the pinpoint's own aspect) has the most rows of newlines."""
    most = 0
    for h, w in pinpoints:
        rows, cols = int(h) // tile, int(w) // tile
        most = max(most, keep + min(rows * cols * keep, rows * cols * patches * patches) + rows * patches)
    return most
