"""What a stored prediction was made from, as two hashes: the *row* (question, media bytes, answers, ...)
and the *setting* (the artifact or model, rule, ratio, weights, generation length).

``apet-eval`` resumes by these keys, not by question ids: a question edited, an answer corrected or an
image replaced under the same id changes the row key, so its old prediction is not reused; predictions of
unchanged rows are, whichever run, machine or shard made them (docs/eval.md, DESIGN.md §9). Media are
hashed by content, not by path or modification time, so copying a data set elsewhere keeps its
predictions and re-saving an image with other pixels does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from apet.manifest import Manifest
from apet.media.dataset import EvalItem

_CHUNK = 1 << 20
# manifest fields that say when or by which apet it was made, not what it computes
_NOT_CONTENT = ("created", "apet_version", "digest")


def _canonical(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_digest(path: Path, digest: "hashlib._Hash") -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)


def media_digest(path: Path) -> str:
    """SHA-256 of a medium's bytes; a directory of video frames hashes each file's relative name and bytes."""
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _file_digest(file, digest)
            digest.update(b"\0")
    else:
        _file_digest(path, digest)
    return digest.hexdigest()


class RowKeys:
    """Row keys of one run; each medium is read once however many questions share it."""

    def __init__(self, images: Path) -> None:
        self.images = images
        self._media: dict[str, str] = {}

    def __call__(self, item: EvalItem) -> str:
        if item.path not in self._media:
            self._media[item.path] = media_digest(self.images / item.path)
        return _canonical({"benchmark": item.benchmark, "id": item.id, "question": item.question,
                           "answers": list(item.answers), "type": item.type, "choices": list(item.choices),
                           "media": item.media, "bytes": self._media[item.path]})


def setting_key(manifest: Manifest, method: str, ratio: float, weights: str, generation: dict[str, Any]) -> str:
    """The manifest a pipeline runs under (for an artifact: its export, with the checksum of every graph;
    for a model: its spec, plan and weight format), the rule, ratio and weights, and the generation
    options. The backend is not part of it: backends of one artifact are meant to agree."""
    body = {k: v for k, v in manifest.to_json().items() if k not in _NOT_CONTENT}
    return _canonical({"manifest": body, "method": method, "ratio": ratio, "weights": weights,
                       "generation": generation})
