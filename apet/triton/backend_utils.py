"""What apet's Triton Python models share: Triton's module, their parameters, errors as Triton errors.

``triton_python_backend_utils`` exists only inside Triton's Python stub; it is imported by name when a model
initializes, so importing apet's models (tests, ``apet triton``) never needs it, and tests put their stand-in
(tests/fake_pb_utils.py) in ``sys.modules`` under that name.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from apet.contracts.files import sha256_file
from apet.errors import ApetError, ArtifactError

TRITON_UTILS = "triton_python_backend_utils"


def triton_utils() -> ModuleType:
    return importlib.import_module(TRITON_UTILS)


def model_config(args: dict[str, Any]) -> dict[str, Any]:
    return json.loads(args["model_config"])


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """The model's ``parameters`` {key: {string_value: ...}} as {key: value}."""
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def version_dir(args: dict[str, Any]) -> Path:
    """The loaded version's directory (``model_repository`` is the model's directory in the Python backend)."""
    return Path(args["model_repository"]) / str(args.get("model_version") or "1")


def device_of(args: dict[str, Any]) -> str:
    """The instance's device: ``cuda:N`` for a KIND_GPU instance, else ``cpu``."""
    if str(args.get("model_instance_kind", "CPU")).upper() == "GPU":
        return f"cuda:{args.get('model_instance_device_id', 0)}"
    return "cpu"


def check_digest(path: Path, expected: str, what: str) -> None:
    """Refuse a file whose SHA-256 is not the one the manifest lists (a tampered or mixed repository)."""
    if not path.is_file():
        raise ArtifactError(f"{what} {path} is missing", "rewrite the repository with apet triton")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(f"{what} {path.name} failed its digest check: sha256 {actual}, the manifest lists "
                            f"{expected}", "the file changed after export; re-export the artifact and rewrite the "
                            "repository with apet triton")


def triton_error(pb: ModuleType, exc: BaseException) -> Any:
    """``exc`` as a Triton error whose message names the problem (and the fix, for apet's errors)."""
    message = str(exc) if isinstance(exc, ApetError) else f"internal error: {type(exc).__name__}: {exc}"
    code = getattr(getattr(pb, "TritonError", None), "INVALID_ARG", None)
    if isinstance(exc, ApetError) and not isinstance(exc, ArtifactError) and code is not None:
        return pb.TritonError(message, code)
    return pb.TritonError(message)
