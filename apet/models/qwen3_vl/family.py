"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): facts and factories of the family (torch-free import).

Qwen2.5-VL's dynamic resolution with 16-px patches (N = H·W/32² merged tokens per image), so budgets are per image
as there: ``--ratio r`` keeps ``int(r·N)``, ``--tokens K`` a fixed K; one ApET stage on the merger's output with
the ``blend`` placement. DeepStack: the ViT's intermediate levels, merged like the main tokens, are added to the
hidden states of the first LLM layers at the visual positions; under compression each level keeps the same rows,
formed by the same assignment (``--deepstack merge``, default) or only the kept rows (``--deepstack gather``), see
docs/algorithm.md. ``--pixel-range`` defaults to the checkpoint's own range (there is no authors' range).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from apet.models.family import FamilyOption, Processor
from apet.models.qwen2_5_vl.family import TYPICAL_IMAGE, QwenFamily
from apet.models.qwen2_5_vl.pixel_range import CHECKPOINT, pixel_range_option
from apet.models.shared.options import prompt_template_option

if TYPE_CHECKING:
    from apet.manifest import Manifest

DEEPSTACK_FLAG = "--deepstack"
DEEPSTACK_MODES = ("merge", "gather")
DEEPSTACK = FamilyOption(
    DEEPSTACK_FLAG, "what DeepStack levels (vision features added to the first LLM layers at the visual positions) "
    "keep under ApET: merge = the kept rows formed as the main tokens' (dropped tokens averaged into the kept token "
    "they merged into, the basis slots blended); gather = the kept rows only", default="merge",
    choices=DEEPSTACK_MODES)  # applied as the adapter's set_deepstack


class Qwen3Family(QwenFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    aliases = {"qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct", "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
               "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct"}
    shapes = ("qwen3-vl-8b-shapes",)
    tiny = "tiny-qwen3-vl"
    export_options = (
        pixel_range_option(CHECKPOINT),  # no authors' range exists: Hugging Face's inputs
        prompt_template_option("qwen3_chat; default: the checkpoint's chat template"),
        DEEPSTACK,
    )

    def processor(self, artifact_dir: Path | None, manifest: "Manifest") -> Processor:
        from apet.models.qwen3_vl.processor import Qwen3Processor

        return Qwen3Processor(artifact_dir, manifest)

    def preprocessing_summary(self, manifest: "Manifest") -> str:
        mode = manifest.model.extra.get("deepstack", "merge")
        return f"{super().preprocessing_summary(manifest)}; DeepStack levels: {mode}"

    def vision_dims(self, manifest: "Manifest", max_batch: int) -> dict[str, tuple[int, int, int]]:
        from apet.models.qwen2_5_vl.geometry import grid_bounds
        from apet.models.qwen2_5_vl.preprocess import patch_grid

        recipe = self._recipe(manifest)
        low, high = grid_bounds(recipe)["patches"]
        rows, cols = patch_grid(*TYPICAL_IMAGE, recipe)
        return {"batch": (1, 1, max_batch), "patches": (low, min(max(rows * cols, low), high), high)}

    def profiling_vision_inputs(self, manifest: "Manifest") -> dict[str, np.ndarray]:
        from apet.models.qwen2_5_vl.geometry import patch_positions
        from apet.models.qwen2_5_vl.preprocess import patch_grid

        recipe = self._recipe(manifest)
        return {"patch_positions": patch_positions(*patch_grid(*TYPICAL_IMAGE, recipe), recipe.merge_size)}
