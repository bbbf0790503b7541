"""The vision graph: tower -> select layer -> drop CLS -> ApET (stage 1) -> projector."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from apet.compression import Compressed, CompressionConfig, compress
from apet.export.onnx_utils import export_onnx
from apet.export.scope import Scope
from apet.models.base import VisionLanguageAdapter

VISION_INPUTS = ["pixel_values"]
VISION_OUTPUTS = ["visual_embeds", "keep_index"]


class VisionGraph(nn.Module):
    """What ``vision.onnx`` computes; also the PyTorch reference the tests compare it with.

    The projector runs on the K1 kept tokens only: it is per-token, so this
    equals the reference's project-then-select at K1/N of the cost. Each part
    runs in its own :class:`Scope` (``vision/``, ``apet_stage1/``,
    ``projector/``) so profiles attribute time to it.
    """

    def __init__(self, adapter: VisionLanguageAdapter, compression: CompressionConfig) -> None:
        super().__init__()
        # attribute names are the node-name scopes (apet.scopes.VISION, APET_STAGE1, PROJECTOR)
        self.vision = Scope(adapter.vision_features)
        self.apet_stage1 = Scope(self._compress)
        self.projector = Scope(adapter.project)
        self.model = adapter.model  # registered so tracing sees the weights
        self.compression = compression

    def _compress(self, features: torch.Tensor) -> Compressed:
        c = self.compression
        return compress(features, keep=c.keep, basis=c.basis, method=c.method, merge=c.merge, seed=c.seed)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self.apet_stage1(self.vision(pixel_values))
        return self.projector(kept.tokens), kept.index


def export_vision(adapter: VisionLanguageAdapter, compression: CompressionConfig, path: Path, *,
                  opset: int, example_batch: int = 2) -> Path:
    """Write ``vision.onnx`` with a dynamic batch axis; dtypes follow the adapter's weights."""
    proc = adapter.spec.processor
    example = torch.randn(example_batch, 3, proc.crop_height, proc.crop_width, dtype=adapter.dtype,
                          device=adapter.device)
    return export_onnx(
        VisionGraph(adapter, compression).eval(), (example,), path,
        input_names=VISION_INPUTS, output_names=VISION_OUTPUTS,
        dynamic_axes={"pixel_values": {0: "batch"}, "visual_embeds": {0: "batch"}, "keep_index": {0: "batch"}},
        opset=opset,
    )
