"""InternVL's dynamic tiling, torch-free: which grid of square tiles an image gets, and its views.

Hugging Face's ``GotOcr2ImageProcessor`` (``crop_to_patches``, which ``InternVLProcessor`` turns on) picks,
among the grids of ``min_tiles..max_tiles`` tiles, the one whose aspect ratio (columns / rows) is closest to the
image's; on a tie it moves to the later (larger) grid while the image's area exceeds half the grid's. The image
is resized (aspect not kept) to columns x rows tiles, cut in raster order, and — when there is more than one
tile — followed by a thumbnail of the whole image squashed to one tile. Every view yields the same number of
visual tokens. The formulas follow transformers' ``get_all_supported_aspect_ratios`` and
``get_optimal_tiled_canvas`` (which differ from the authors' ``dynamic_preprocess`` only in the order of
equal-area grids, i.e. only on exact ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=32)
def supported_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) of every grid with ``min_tiles..max_tiles`` tiles, fewest tiles first (a stable sort of
    the column-major enumeration, as Hugging Face lists them)."""
    grids = [(cols, rows) for cols in range(1, max_tiles + 1) for rows in range(1, max_tiles + 1)
             if min_tiles <= cols * rows <= max_tiles]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def best_grid(size: tuple[int, int], tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) for an image of (height, width)."""
    height, width = size
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in supported_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class Tiling:
    """One image's tiles: the original (height, width), the grid and whether a thumbnail follows the tiles."""

    size: tuple[int, int]
    grid: tuple[int, int]  # (columns, rows)
    tile: int

    @classmethod
    def of(cls, size: tuple[int, int], tile: int, min_tiles: int, max_tiles: int) -> "Tiling":
        if max_tiles <= 1:  # the processor does not tile at all: one view, the image squashed to a tile
            return cls(size, (1, 1), tile)
        return cls(size, best_grid(size, tile, min_tiles, max_tiles), tile)

    @property
    def tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def thumbnail(self) -> bool:
        return self.tiles > 1

    @property
    def views(self) -> int:
        """Vision-graph rows of this image: the tiles, plus the thumbnail when there is more than one tile."""
        return self.tiles + int(self.thumbnail)

    @property
    def canvas(self) -> tuple[int, int]:
        """(width, height) the image is resized to before it is cut."""
        return self.grid[0] * self.tile, self.grid[1] * self.tile

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of every tile on the canvas, in raster order."""
        cols, rows = self.grid
        return [(c * self.tile, r * self.tile, (c + 1) * self.tile, (r + 1) * self.tile)
                for r in range(rows) for c in range(cols)]


def views_for(tiles: int) -> int:
    """Views of an image cut into ``tiles`` tiles (the thumbnail joins when there is more than one)."""
    return tiles + (1 if tiles > 1 else 0)


def most_views(min_tiles: int, max_tiles: int) -> int:
    """The most views one image can have: the largest grid (at most ``max_tiles``) plus its thumbnail."""
    if max_tiles <= 1:
        return 1
    return views_for(max(cols * rows for cols, rows in supported_grids(min_tiles, max_tiles)))


def fewest_views(min_tiles: int, max_tiles: int) -> int:
    if max_tiles <= 1:
        return 1
    return views_for(min(cols * rows for cols, rows in supported_grids(min_tiles, max_tiles)))
