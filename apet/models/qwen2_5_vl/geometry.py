"""Index bookkeeping the host computes for the vision graph and the LLM, torch-free (as Edge-LLM does).

For one image of ``grid`` = (rows, columns) 14-px patches, in the patch order of
:func:`~apet.models.qwen2_5_vl.preprocess.patchify` (2x2 merge blocks consecutive, blocks in raster order):

* ``patch_positions`` [P, 2]: each patch's (row, column), the input of the ViT's 2-D rotary embedding;
* ``window_index`` [W, S]: the patches of each attention window, S = (window/14)² slots, -1 for the
  slots an edge window lacks. Windows tile the merged grid from the top left in raster order and list
  their merge blocks in raster order, exactly the order of Hugging Face's ``get_vision_window_index``;
* ``window_slot`` [P]: where each patch sits in the flattened [W·S] window layout (the inverse gather).

With these the graph runs window attention as gather -> [W, S] attention with a key mask -> gather
back, so no data-dependent index arithmetic and no [P, P] mask exist in the graph.

:func:`mrope_positions` gives the LLM's 3-D (temporal, height, width) positions of one prompt as
Hugging Face's ``get_rope_index`` computes them for the full sequence, gathered at the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apet.models.qwen2_5_vl.preprocess import MAX_ASPECT, QwenImageRecipe


@dataclass(frozen=True)
class WindowLayout:
    patch_positions: np.ndarray  # [P, 2] int64
    window_index: np.ndarray  # [W, S] int64, -1 = empty slot
    window_slot: np.ndarray  # [P] int64

    def arrays(self) -> dict[str, np.ndarray]:
        return {"patch_positions": self.patch_positions, "window_index": self.window_index,
                "window_slot": self.window_slot}


def patch_positions(rows: int, cols: int, merge: int) -> np.ndarray:
    """(row, column) of every patch in merge-block order (Hugging Face's ``get_vision_position_ids``)."""
    h, w = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    shape = (rows // merge, merge, cols // merge, merge)
    h = h.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    w = w.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([h, w], axis=-1).astype(np.int64)


def window_side(recipe: QwenImageRecipe) -> int:
    """Merge blocks per window side (112 px / 14 / 2 = 4)."""
    return recipe.window_size // recipe.merge_size // recipe.patch_size


def window_count(rows: int, cols: int, recipe: QwenImageRecipe) -> int:
    side, m = window_side(recipe), recipe.merge_size
    return -(-(rows // m) // side) * -(-(cols // m) // side)


def window_layout(rows: int, cols: int, recipe: QwenImageRecipe) -> WindowLayout:
    m, side = recipe.merge_size, window_side(recipe)
    units_h, units_w = rows // m, cols // m
    per_unit = m * m
    slots = side * side * per_unit
    windows = []
    for top in range(0, units_h, side):
        for left in range(0, units_w, side):
            units = [r * units_w + c for r in range(top, min(top + side, units_h))
                     for c in range(left, min(left + side, units_w))]
            patches = [u * per_unit + j for u in units for j in range(per_unit)]
            windows.append(patches + [-1] * (slots - len(patches)))
    index = np.asarray(windows, dtype=np.int64)
    slot = np.empty(rows * cols, dtype=np.int64)
    flat = index.reshape(-1)
    valid = flat >= 0
    slot[flat[valid]] = np.nonzero(valid)[0]
    return WindowLayout(patch_positions(rows, cols, m), index, slot)


def grid_bounds(recipe: QwenImageRecipe) -> dict[str, tuple[int, int]]:
    """(min, max) of patches and windows over every grid the processor can produce (profiles); patches only for
    a ViT without window attention (``window_size`` 0)."""
    step = recipe.merge_size
    factor_px = recipe.patch_size * recipe.patch_size
    low, high = -(-recipe.min_pixels // factor_px), recipe.max_pixels // factor_px
    patches, windows = [], []
    for rows in range(step, high + 1, step):
        for cols in range(step, high // rows + 1, step):
            if rows * cols < low or max(rows, cols) > MAX_ASPECT * min(rows, cols):
                continue
            patches.append(rows * cols)
            if recipe.window_size:
                windows.append(window_count(rows, cols, recipe))
    bounds = {"patches": (min(patches), max(patches))}
    return {**bounds, "windows": (min(windows), max(windows))} if windows else bounds


def merged_grid(grid: tuple[int, int], recipe: QwenImageRecipe) -> tuple[int, int]:
    return grid[0] // recipe.merge_size, grid[1] // recipe.merge_size


def mrope_positions(before: int, grid: tuple[int, int], after: int, kept: np.ndarray,
                    recipe: QwenImageRecipe) -> np.ndarray:
    """[3, before + len(kept) + after] positions of one prompt: text before at 0.., the image's merged tokens
    at (start, start + row, start + column) for row-major index i = row·W + column (only the ``kept``
    indices, not renumbered), text after from start + max(H, W) on."""
    height, width = merged_grid(grid, recipe)
    kept = np.asarray(kept, dtype=np.int64)
    text = np.arange(before, dtype=np.int64)
    start = before
    vision = np.stack([np.full(kept.shape, start), start + kept // width, start + kept % width])
    tail = start + max(height, width) + np.arange(after, dtype=np.int64)
    return np.concatenate([np.stack([text] * 3), vision, np.stack([tail] * 3)], axis=1).astype(np.int64)
