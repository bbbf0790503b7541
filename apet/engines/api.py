"""The one place that knows how TensorRT and TensorRT-RTX differ.

Everything else in :mod:`apet.engines` is written against the ``tensorrt``
Python API; the two modules share it for parsing, profiles, building and
(de)serialising. What differs, and is handled only here:

* import name and pip extra (``tensorrt`` / ``tensorrt_rtx_bindings``);
* the strongly-typed flag's bit (``STRONGLY_TYPED`` is bit 1 in TensorRT 10,
  bit 0 in TensorRT-RTX, so it is always looked up by name);
* compute-capability targets for ahead-of-time builds (TensorRT-RTX only;
  TensorRT builds for the GPU it runs on);
* caches: a timing cache for TensorRT, a runtime (JIT kernel) cache for
  TensorRT-RTX, which lives at inference time;
* TensorRT-RTX needs no GPU to build, TensorRT does.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from apet.errors import BackendError, UsageError

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
_EXTRAS = {"tensorrt": "trt", "tensorrt-rtx": "rtx"}


@dataclass(frozen=True)
class TrtApi:
    """A loaded TensorRT flavour and the few facts that differ between flavours."""

    kind: str  # "tensorrt" | "tensorrt-rtx"
    module: ModuleType

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "unknown"))

    @property
    def is_rtx(self) -> bool:
        return self.kind == "tensorrt-rtx"

    def strongly_typed_flags(self) -> int:
        return 1 << int(self.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def set_compute_capabilities(self, config: Any, targets: list[str]) -> list[str]:
        """Set AOT targets (TensorRT-RTX); returns what was set. TensorRT builds for the local GPU."""
        if not targets:
            return []
        if not self.is_rtx:
            raise UsageError("--compute-capability only applies to TensorRT-RTX ahead-of-time builds",
                             "drop the option, or pass --backend tensorrt-rtx")
        members = self.module.ComputeCapability.__members__
        chosen = [_capability_name(t) for t in targets]
        for target, name in zip(targets, chosen):
            if name not in members or name == "NONE":
                allowed = ", ".join(m.lower() for m in members if m != "NONE")
                raise UsageError(f"compute capability {target!r} is not a TensorRT-RTX target",
                                 f"use one of {allowed}")
        config.num_compute_capabilities = len(chosen)
        for i, name in enumerate(chosen):
            config.set_compute_capability(members[name], i)
        return chosen

    def attach_timing_cache(self, config: Any, blob: bytes) -> Any:
        """A timing cache speeds up TensorRT rebuilds; TensorRT-RTX tunes at run time instead."""
        if self.is_rtx:
            return None
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        return cache

    def can_deserialize_here(self) -> bool:
        """Engines can only be opened where a CUDA device is present."""
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:  # pragma: no cover - torch is a hard dependency
            return False


def _capability_name(target: str) -> str:
    """'8.6', '86', 'sm86', 'SM_86' -> 'SM86'; 'current' -> 'CURRENT'."""
    text = target.strip().lower()
    if text == "current":
        return "CURRENT"
    return "SM" + text.removeprefix("sm").replace("_", "").replace(".", "")


def load_api(backend: str = "auto") -> TrtApi:
    """Import the requested flavour (``auto``: TensorRT if importable, else TensorRT-RTX)."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r} is unknown", f"use one of {', '.join(BACKENDS)}")
    order = ["tensorrt", "tensorrt-rtx"] if backend == "auto" else [backend]
    failures = []
    for kind in order:
        try:
            return TrtApi(kind, importlib.import_module(_MODULES[kind]))
        except Exception as exc:  # ImportError, or a broken CUDA library load
            failures.append(f"{_MODULES[kind]}: {exc}")
    wanted = " or ".join(f'pip install "apet[{_EXTRAS[k]}]"' for k in order)
    raise BackendError(f"no TensorRT builder could be imported ({'; '.join(failures)})", f"install one: {wanted}")
