"""The vision graph: tower -> select layer -> drop CLS -> ApET (stage 1) -> projector."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from apet.compression import CompressionConfig
from apet.export.onnx_utils import export_onnx
from apet.models.base import VisionLanguageAdapter

VISION_INPUTS = ["pixel_values"]
VISION_OUTPUTS = ["visual_embeds", "keep_index"]


class VisionGraph(nn.Module):
    """What ``vision.onnx`` computes; also the PyTorch reference the tests compare it with.

    The projector runs on the K1 kept tokens only: it is per-token, so this
    equals the reference's project-then-select at K1/N of the cost.
    """

    def __init__(self, adapter: VisionLanguageAdapter, compression: CompressionConfig) -> None:
        super().__init__()
        self.model = adapter.model  # registered so tracing sees the weights
        self._adapter = adapter
        self.compression = compression

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._adapter.vision_features(pixel_values)
        kept = self.compression.apply(features)
        return self._adapter.project(kept.tokens), kept.index


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
