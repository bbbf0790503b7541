"""How many TensorRT layers ApET's stages parse into, for the bench's Jetson projection (:func:`flops.project_apet`).

ApET alone is exported (float16 in, as in an engine) and parsed by whichever TensorRT flavour imports (TensorRT-RTX
parses on a CPU). The count does not depend on the model's size — k, K and N are static, and the graph has the same
nodes at 7B shapes as at tiny ones (docs/benchmarks.md, "ApET's cost inside the engines") — so a small feature
width is traced. Stage 2 is counted without the sequence rebuild around it (~80 more layers in an artifact's
``apet_stage2`` scope; ``apet inspect`` and ``build_report.json`` count the real graphs).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

import torch

from apet.compression import CompressionModule
from apet.contracts.compression import CompressionConfig, Stage2Config

log = logging.getLogger(__name__)
TRACE_DIM = 64  # feature width of the traced graph: the layer count does not depend on it


@functools.lru_cache(maxsize=32)
def parsed_layers(config: CompressionConfig, tokens: int) -> int | None:
    """Parsed TensorRT layers of ``compress`` with ``config`` on ``tokens`` tokens; None without TensorRT."""
    from apet.engines.api import load_api
    from apet.engines.trt import parse_layer_counts
    from apet.errors import ApetError
    from apet.export.onnx_utils import export_onnx

    try:
        api = load_api("auto")
    except ApetError as exc:
        log.info("ApET's TensorRT layers not counted: %s", exc)
        return None
    axes = {"x": {0: "batch", 1: "tokens"} if config.per_image else {0: "batch"}}
    with tempfile.TemporaryDirectory(prefix="apet-layers-") as scratch:
        path = Path(scratch) / "apet.onnx"
        export_onnx(CompressionModule(config).eval(), (torch.randn(1, tokens, TRACE_DIM, dtype=torch.float16),), path,
                    input_names=["x"], output_names=["tokens", "index"], dynamic_axes=axes)
        return sum(parse_layer_counts(api, path).values())


def stage_layers(stage1: CompressionConfig, stage2: Stage2Config | None, tokens: int) -> dict[str, int]:
    """{"apet_stage1": n, "apet_stage2": m} for the stages that compress (a stage keeping every token has none);
    empty when no TensorRT module imports."""
    counts: dict[str, int] = {}
    if stage1.keep_for(tokens) < tokens:
        counts["apet_stage1"] = parsed_layers(stage1, tokens)
    if stage2 is not None:
        counts["apet_stage2"] = parsed_layers(stage2.compression, stage2.span)
    return {stage: n for stage, n in counts.items() if n is not None}
