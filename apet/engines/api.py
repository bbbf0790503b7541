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
* TensorRT-RTX needs no GPU to build, TensorRT does;
* where the module comes from: TensorRT from PyPI (``apet[trt]``) or, on a Jetson, from JetPack's
  ``python3-libnvinfer`` in the system dist-packages, which a virtual environment made without
  ``--system-site-packages`` does not see (:func:`find_tensorrt`, docs/jetson.md).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from apet.errors import BackendError, MissingExtraError, UsageError

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
_EXTRAS = {"tensorrt": "trt", "tensorrt-rtx": "rtx"}
log = logging.getLogger(__name__)
JETPACK_HINT = ("on a Jetson, TensorRT's Python module comes with JetPack (sudo apt install python3-libnvinfer), "
                "not from PyPI")


def system_site_dirs() -> list[Path]:
    """Where Debian/JetPack packages put Python modules for this interpreter's version."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return [Path("/usr/lib/python3/dist-packages"), Path(f"/usr/lib/{version}/dist-packages"),
            Path(f"/usr/local/lib/{version}/dist-packages")]


def _system_tensorrt(dirs: list[Path] | None = None) -> Path | None:
    """JetPack's ``tensorrt`` package directory, when it has an extension built for this interpreter."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-310-aarch64-linux-gnu.so
    for directory in dirs if dirs is not None else system_site_dirs():
        package = directory / "tensorrt"
        if (package / "__init__.py").is_file() and any(package.glob(f"*{suffix}")):
            return package
    return None


def find_tensorrt() -> str | None:
    """Where a TensorRT flavour would be imported from, without importing it: a module name on ``sys.path``
    or JetPack's package directory; None when there is none."""
    for module in _MODULES.values():
        if importlib.util.find_spec(module) is not None:
            return module
    package = _system_tensorrt()
    return None if package is None else str(package)


def _import_system_tensorrt(package: Path) -> ModuleType:
    """Import JetPack's ``tensorrt`` by its path, as ``tensorrt``, without putting the whole system
    dist-packages (its numpy, ...) on ``sys.path``."""
    spec = importlib.util.spec_from_file_location("tensorrt", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    if spec is None or spec.loader is None:
        raise ImportError(f"{package} is not an importable package")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tensorrt"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("tensorrt", None)
        raise
    log.info("using JetPack's TensorRT %s from %s", getattr(module, "__version__", "?"), package)
    return module


def import_tensorrt_module(kind: str) -> ModuleType:
    """The flavour's module from ``sys.path``; for plain TensorRT also from JetPack's dist-packages."""
    try:
        return importlib.import_module(_MODULES[kind])
    except ImportError:
        package = _system_tensorrt() if kind == "tensorrt" else None
        if package is None:
            raise
        return _import_system_tensorrt(package)


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
        """Engines can only be opened where the CUDA driver shows a device (asked without torch)."""
        from apet.cuda_memory import cuda_device_count

        return cuda_device_count() > 0


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
    failures, missing = [], True
    for kind in order:
        try:
            return TrtApi(kind, import_tensorrt_module(kind))
        except Exception as exc:  # ImportError, or a broken CUDA library load
            failures.append(f"{_MODULES[kind]}: {exc}")
            missing = missing and isinstance(exc, ModuleNotFoundError)
    wanted = " or ".join(f'pip install "apet[{_EXTRAS[k]}]"' for k in order)
    jetpack = f"; {JETPACK_HINT}" if "tensorrt" in order else ""
    # not installed at all: the missing extra (exit 7); installed but failing to load: a backend error (exit 5)
    error = MissingExtraError if missing else BackendError
    raise error(f"no TensorRT module could be imported ({'; '.join(failures)})", f"install one: {wanted}{jetpack}")
