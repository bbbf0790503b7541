"""The one recipe for ONNX Runtime session options of apet's backends (torch-free): every session of the ONNX Runtime
backend, the static-KV form's per-batch decode sessions and the profiled ones are made from it, so they cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def session_options(ort: Any, threads: int = 0, profile_prefix: Path | None = None) -> Any:
    """``SessionOptions`` with ``threads`` intra-op threads (0: ONNX Runtime's default) and, with
    ``profile_prefix``, its profiler writing there.

    Weight-only quantized graphs (DequantizeLinear -> MatMul) are fused into ORT's MatMulNBits; its CPU default
    (accuracy level 4) also quantizes the *activations* to int8. Level 1 computes in float32, so ONNX Runtime computes
    what the graph says (the weight-only model TensorRT builds)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return options
