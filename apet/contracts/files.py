"""File-level contracts: hashing, and the engines' build report (written by ``engines``, read by
``runtime`` and ``apet inspect``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from apet.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "build_report.json"
ENGINE_FILES = {"vision": "vision.plan", "llm": "llm.plan"}
EMBEDDINGS_FILE = "embed_tokens.safetensors"
EMBEDDINGS_TENSOR = "weight"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_digest(artifact: Path) -> str:
    return sha256_file(Path(artifact) / MANIFEST_NAME)


def read_report(artifact: Path) -> dict[str, Any] | None:
    """The build report, or None before any build; ArtifactError when it is unreadable."""
    path = Path(artifact) / REPORT_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", "rebuild the engines with apet-build") from exc
    if not isinstance(data, dict) or not isinstance(data.get("engines"), dict):
        raise ArtifactError(f"{path} is malformed", "rebuild the engines with apet-build --overwrite")
    return data
