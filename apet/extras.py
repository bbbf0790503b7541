"""Which optional part of apet (``pip install 'apet[EXTRA]'``) a command needs, and one clear line when it is missing.

``pip install apet`` is the deploy runtime (ONNX Runtime, tokenizers, Pillow, safetensors, onnx): what runs and
serves an artifact on a Jetson. Everything that needs torch or transformers (export, quantization, the torch
backend, apet-bench) is the ``export`` extra; the other extras add one feature each. Commands import their heavy
parts through :func:`import_extra`, so a missing one is :class:`apet.errors.MissingExtraError` (exit 7), never a
traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from apet.errors import MissingExtraError

# the distributions each extra brings, by their import names (one home: pyproject.toml's lists say the same)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "onnxscript", "onnx_ir", "matplotlib", "huggingface_hub"),
    "serve": ("starlette", "uvicorn", "prometheus_client"),
    "video": ("av",),
    "rtx": ("tensorrt_rtx_bindings",),
    "trt": ("tensorrt",),
    "cuda12": ("cuda",),
    "cuda13": ("cuda",),
    "check": ("polygraphy",),  # apet check: NVIDIA Polygraphy's runners and Comparator
}


def _extra_of(module: str | None) -> str | None:
    top = (module or "").split(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def missing_extra(exc: ModuleNotFoundError, extra: str, purpose: str) -> MissingExtraError:
    """The one-line error for ``exc`` raised while importing what ``purpose`` needs from ``extra``."""
    return MissingExtraError(f"{purpose} needs the Python package {exc.name!r}, which is not installed",
                             f"pip install 'apet[{extra}]'")


def extra_error(exc: ModuleNotFoundError, purpose: str) -> MissingExtraError | None:
    """``exc`` as the extra that brings the missing package, or None when no extra does (a bug, re-raised)."""
    owner = _extra_of(exc.name)
    return None if owner is None else missing_extra(exc, owner, purpose)


def import_extra(module: str, *, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``; a missing package of an optional extra becomes a MissingExtraError
    naming ``extra`` (a missing module of apet itself or of the base install stays a bug and propagates)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in EXTRA_MODULES.get(extra, ()):
            raise missing_extra(exc, extra, purpose) from exc
        error = extra_error(exc, purpose)
        if error is None:
            raise
        raise error from exc
