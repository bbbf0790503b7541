"""apet: ApET visual-token compression inside ONNX graphs and TensorRT engines for vision-language models.

``from apet import Pipeline`` is the Python entry point (``Pipeline.load(artifact_dir)``); it is imported
lazily so ``import apet`` (and every CLI start) stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "Result", "GenerationConfig", "__version__"]

_LAZY = {"Pipeline": "apet.runtime.pipeline", "Result": "apet.runtime.pipeline",
         "GenerationConfig": "apet.runtime.sampling"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'apet' has no attribute {name!r}")
