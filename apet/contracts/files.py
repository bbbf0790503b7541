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
TRTEXEC_SCRIPT = "trtexec.sh"


def layers_file(graph: str) -> str:
    """The engine inspector's JSON that apet-build writes beside ``graph``'s plan."""
    return f"{graph}.layers.json"


# what apet-build and --emit-trtexec write beside the manifest's files: apet owns these too (--overwrite replaces
# them); everything else in an artifact directory belongs to the user (DESIGN §3)
BUILD_OUTPUTS = (REPORT_NAME, *ENGINE_FILES.values(), *(layers_file(g) for g in ENGINE_FILES), TRTEXEC_SCRIPT)
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
