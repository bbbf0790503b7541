"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): facts and factories of the family (torch-free import).

Dynamic resolution: an image has N = H·W/28² merged tokens (N varies per image, bounded by the
processor's pixel range), so budgets are per image (``dynamic_tokens``): ``--ratio r`` keeps the
authors' ``int(r·N)``, ``--tokens K`` a fixed K (images resized to at least K tokens). Stage 1 runs on
the merger's output with the ``blend`` placement; there is no second stage (the authors' is
commented out and the paper's Qwen numbers come from stage 1 only). The pixel range is an export option
of the family (``--pixel-range``, default the authors' 256..2048 tokens: :mod:`~apet.models.qwen2_5_vl.pixel_range`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from apet.models.family import Family, Layout, Processor, VisionInputs
from apet.models.qwen2_5_vl.pixel_range import AUTHORS, pixel_range_option
from apet.models.shared.options import prompt_template_option

if TYPE_CHECKING:
    from apet.manifest import Manifest

TYPICAL_IMAGE = (640, 480)  # profiles' opt shapes and typical budgets


class QwenFamily(Family):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    aliases = {"qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
               "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct"}
    shapes = ("qwen2.5-vl-3b-shapes", "qwen2.5-vl-7b-shapes")
    tiny = "tiny-qwen2.5-vl"
    stage1_placement = "blend"
    max_stages = 1
    dynamic_tokens = True
    export_options = (
        pixel_range_option(AUTHORS),  # fidelity: the range of the authors' evaluation
        prompt_template_option("qwen_chat; default: the checkpoint's chat template"),
    )

    def processor(self, artifact_dir: Path | None, manifest: "Manifest") -> Processor:
        from apet.models.qwen2_5_vl.processor import QwenProcessor

        return QwenProcessor(artifact_dir, manifest)

    # -- budgets and profiles ----------------------------------------------------------------------
    @staticmethod
    def _recipe(manifest: "Manifest"):
        from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe

        return QwenImageRecipe.from_json(manifest.model.processor)

    def max_visual_tokens(self, manifest: "Manifest") -> int:
        return manifest.compression.stage1.keep  # K of the largest image (or the fixed K)

    def visual_summary(self, manifest: "Manifest") -> str:
        stage1 = manifest.compression.stage1
        if stage1.keep_ratio is None:
            return f"{stage1.keep} per image"
        return f"up to {self.max_visual_tokens(manifest)} per image, {self.typical_visual_tokens(manifest)} for a " \
               f"typical {TYPICAL_IMAGE[0]}x{TYPICAL_IMAGE[1]} photo"

    def preprocessing_summary(self, manifest: "Manifest") -> str:
        return self._recipe(manifest).range_summary()

    def typical_visual_tokens(self, manifest: "Manifest") -> int:
        from apet.models.qwen2_5_vl.preprocess import patch_grid

        rows, cols = patch_grid(*TYPICAL_IMAGE, self._recipe(manifest))
        return manifest.compression.stage1.keep_for(rows * cols // 4)

    def vision_dims(self, manifest: "Manifest", max_batch: int) -> dict[str, tuple[int, int, int]]:
        from apet.models.qwen2_5_vl.geometry import grid_bounds, window_count
        from apet.models.qwen2_5_vl.preprocess import patch_grid

        recipe = self._recipe(manifest)
        bounds = grid_bounds(recipe)
        rows, cols = patch_grid(*TYPICAL_IMAGE, recipe)
        opt = {"patches": rows * cols, "windows": window_count(rows, cols, recipe)}
        dims = {name: (low, min(max(opt[name], low), high), high) for name, (low, high) in bounds.items()}
        return {"batch": (1, 1, max_batch), **dims}

    def profiling_vision_inputs(self, manifest: "Manifest") -> dict[str, np.ndarray]:
        from apet.models.qwen2_5_vl.geometry import window_layout
        from apet.models.qwen2_5_vl.preprocess import patch_grid

        recipe = self._recipe(manifest)
        return window_layout(*patch_grid(*TYPICAL_IMAGE, recipe), recipe).arrays()

    def hf_generate_inputs(self, inputs: VisionInputs, layout: Layout) -> dict[str, np.ndarray]:
        """Patches and grids as ``Qwen2_5_VLProcessor`` returns them, and ``mm_token_type_ids``: without it
        ``generate`` silently falls back to 1-D positions."""
        infos = inputs.meta
        return {"pixel_values": np.concatenate([i.patches for i in infos]),
                "image_grid_thw": np.asarray([[1, *i.grid] for i in infos], dtype=np.int64),
                "mm_token_type_ids": (layout.visual_rows >= 0).astype(np.int64)}
