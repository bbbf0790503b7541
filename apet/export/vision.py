"""``vision.onnx``: the family's vision stages (features -> ApET stage 1 -> finish) traced generically."""

from __future__ import annotations

from pathlib import Path

from apet.compression import selector
from apet.contracts.compression import CompressionConfig
from apet.export.attention import hf_attention
from apet.export.onnx_utils import export_onnx
from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.registry import get_family


def export_vision(adapter: VisionLanguageAdapter, compression: CompressionConfig, path: Path, *,
                  opset: int, attention: str = "pattern", example_batch: int = 2) -> Path:
    """Write ``vision.onnx`` with the family's dynamic axes; dtypes follow the adapter's weights. With
    ``attention="op"`` the tower's Hugging Face attention modules write ONNX ``Attention`` nodes."""
    stages = get_family(adapter.family).vision_stages(adapter, selector(compression)).eval()
    with hf_attention(adapter.model, attention):
        return export_onnx(stages, stages.example_inputs(example_batch), path, input_names=stages.input_names,
                           output_names=stages.output_names, dynamic_axes=stages.dynamic_axes(), opset=opset)
