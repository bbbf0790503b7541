"""One copy of the weights for two graphs traced from the same module: the static-KV form's ``llm_decode.onnx``
reads its weights from ``llm_prefill.onnx.data``.

Why: both graphs are traced from the same decoder, so every projection's weight is in both, and each graph's save
wrote its own copy (26 GB for LLaVA-1.5-7B in fp16 where 13 GB are weights; docs/benchmarks.md). The TorchScript
exporter names the two copies differently (``onnx::MatMul_1639`` in one graph, ``onnx::MatMul_1449`` in the other:
the transposed weights it folds are numbered per trace), so tensors are matched by content: the same type, shape
and bytes. Only tensors stored as external data take part (a model small enough for one protobuf has none); what
the second graph holds alone (constants the first graph does not have) is rewritten into its own, smaller file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

log = logging.getLogger(__name__)
ALIGN = 4096  # offsets of the rewritten file: page-aligned, so a runtime may map tensors where they lie


@dataclass(frozen=True)
class SharedWeights:
    """What :func:`share_weights` did: tensors (and bytes) the second graph now reads from the first's files,
    and bytes left in its own file."""

    shared: int
    shared_bytes: int
    own_bytes: int


class _Tensors:
    """External tensors' bytes and digests, read from the files beside the graphs (each file opened once)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[str, object] = {}
        self.digests: dict[tuple[str, int, int | None], bytes] = {}

    def read(self, tensor: onnx.TensorProto) -> bytes:
        location, offset, length = _where(tensor)
        handle = self.files.get(location)
        if handle is None:
            handle = self.files[location] = open(self.directory / location, "rb")  # noqa: SIM115 - closed in close()
        handle.seek(offset)
        return handle.read(length) if length is not None else handle.read()

    def digest(self, tensor: onnx.TensorProto) -> bytes:
        where = _where(tensor)
        if where not in self.digests:
            self.digests[where] = hashlib.sha256(self.read(tensor)).digest()
        return self.digests[where]

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _where(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(file, offset, length: None runs to the end of the file) of an external tensor."""
    info = ExternalDataInfo(tensor)
    return info.location, info.offset or 0, info.length


def _external(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [tensor for tensor in model.graph.initializer if uses_external_data(tensor)]


def _kind(tensor: onnx.TensorProto) -> tuple[int, tuple[int, ...]]:
    return tensor.data_type, tuple(tensor.dims)


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int | None) -> None:
    """Where ``tensor`` lies (onnx's ``set_external_data`` wants the bytes in hand; these stay in their file)."""
    del tensor.external_data[:]
    entries = [("location", location), ("offset", str(offset))] + ([("length", str(length))] if length is not None
                                                                     else [])
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def share_weights(primary: Path, secondary: Path) -> SharedWeights:
    """Point every external tensor of ``secondary`` that equals one of ``primary``'s (type, shape, bytes) at
    ``primary``'s copy; write the rest to ``<secondary>.data`` and rewrite ``secondary``. Both graphs lie in one
    directory (a scratch directory the artifact is moved from, so a failure leaves no half-written artifact)."""
    directory = primary.parent
    first = onnx.load(str(primary), load_external_data=False)
    second = onnx.load(str(secondary), load_external_data=False)
    theirs = _external(second)
    if not theirs or not _external(first):
        return SharedWeights(0, 0, 0)
    candidates: dict[tuple, list[onnx.TensorProto]] = {}
    for tensor in _external(first):
        candidates.setdefault(_kind(tensor), []).append(tensor)
    old_files = {_where(tensor)[0] for tensor in theirs}
    tensors = _Tensors(directory)
    own: list[onnx.TensorProto] = []
    shared = shared_bytes = 0
    own_name = secondary.name + ".data"
    try:
        for tensor in theirs:
            pool = candidates.get(_kind(tensor), [])
            digest = tensors.digest(tensor)
            match = next((c for c in pool if tensors.digest(c) == digest), None)
            if match is None:
                own.append(tensor)
                continue
            pool.remove(match)  # each of primary's tensors stands for one of secondary's
            location, offset, length = _where(match)
            shared, shared_bytes = shared + 1, shared_bytes + (length or 0)
            _point(tensor, location, offset, length)
        own_bytes = _write_own(directory / own_name, own, tensors)
    finally:
        tensors.close()
    keep = {_where(tensor)[0] for tensor in _external(first)} | ({own_name} if own else set())
    for name in old_files - keep:  # what the second graph no longer reads (never a file of the first's)
        (directory / name).unlink(missing_ok=True)
    partial = secondary.with_name(secondary.name + ".partial")
    partial.write_bytes(second.SerializeToString())
    os.replace(partial, secondary)
    log.info("%s reads %d weights (%.2f GB) from %s; %.2f MB stay its own", secondary.name, shared,
             shared_bytes / 1e9, primary.name, own_bytes / 1e6)
    return SharedWeights(shared, shared_bytes, own_bytes)


def _write_own(path: Path, own: list[onnx.TensorProto], tensors: _Tensors) -> int:
    """Copy the tensors only the second graph has into a new file (it replaces the one they came from, which is
    read while the new one is written) and point them there; returns the bytes written."""
    if not own:
        return 0
    partial = path.with_name(path.name + ".partial")
    written = 0
    with open(partial, "wb") as out:
        for tensor in own:
            data = tensors.read(tensor)
            offset = -(-out.tell() // ALIGN) * ALIGN
            out.write(b"\0" * (offset - out.tell()))
            out.write(data)
            written += len(data)
            _point(tensor, path.name, offset, len(data))
    os.replace(partial, path)
    return written
