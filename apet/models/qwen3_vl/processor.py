"""Qwen3-VL at run time (torch-free): Qwen2.5-VL's processor (images -> patches of one grid per vision run; kept
tokens -> one visual span with the full sequence's M-RoPE positions gathered), whose ViT needs only each patch's
(row, column) — for its 2-D rotary embedding and its learned position table, interpolated to the grid inside the
graph — and no window bookkeeping.

Hugging Face's ``get_rope_index`` for Qwen3-VL places an image as Qwen2.5-VL's does (temporal = start, height =
start + row, width = start + column, text after from start + max(H, W)); its timestamps only concern video.
"""

from __future__ import annotations

import numpy as np

from apet.models.qwen2_5_vl.geometry import patch_positions
from apet.models.qwen2_5_vl.processor import QwenProcessor


class Qwen3Processor(QwenProcessor):
    def grid_arrays(self, grid: tuple[int, int]) -> dict[str, np.ndarray]:
        return {"patch_positions": patch_positions(*grid, self.recipe.merge_size)}
