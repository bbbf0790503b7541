"""The generation model of an ``apet triton`` repository (decoupled Python backend; docs/triton.md).

One instance loads the artifact's LLM through apet's runtime (:class:`apet.runtime.pipeline.Pipeline`, TensorRT
or ONNX Runtime), after checking the artifact against the digest the repository was written for and every file
against the manifest's checksums; its vision step calls the vision model through BLS
(:mod:`apet.triton.vision_call`). Each request gets responses on its own sender: with ``stream`` true, one per text
piece (``text`` only), then a last one with the empty text and the other outputs; otherwise one response with all.
Errors are Triton errors whose message names the problem (bad image, prompt too long, limits of the artifact).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

from apet.errors import ArtifactError, InputError
from apet.manifest import Manifest, read_manifest
from apet.models.registry import family_of
from apet.runtime.pipeline import Pipeline, Result, make_backend
from apet.triton.backend_utils import (
    check_digest,
    device_of,
    model_config,
    parameters,
    triton_error,
    triton_utils,
    version_dir,
)
from apet.triton.vision_call import bls_vision, route_vision

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 64
NPY_MAGIC = b"\x93NUMPY"


def check_artifact(artifact: Path, expected_digest: str, vision_copy: Path | None = None) -> Manifest:
    """The artifact's manifest, once its digest is the one the repository was written for and every file (and
    the vision model's copy of the vision graph) matches the manifest's SHA-256."""
    manifest = read_manifest(artifact)  # refuses a manifest whose own digest does not match its content
    if manifest.digest != expected_digest:
        raise ArtifactError(f"the artifact's manifest digest {manifest.digest} is not {expected_digest}, the one "
                            "this repository was written for", "rewrite the repository with apet triton")
    for name, checksum in sorted(manifest.checksums.items()):
        check_digest(artifact / name, checksum, "artifact file")
    graph = manifest.graphs["vision"].file
    if vision_copy is not None and vision_copy.exists() and graph in manifest.checksums:
        check_digest(vision_copy, manifest.checksums[graph], "the vision model's graph")
    return manifest


class Generation:
    """Requests -> Pipeline.generate -> responses; Triton's module is passed in (the tests' stand-in)."""

    def __init__(self, pb: ModuleType, pipeline: Pipeline) -> None:
        self.pb = pb
        self.pipeline = pipeline
        self.media = family_of(pipeline.manifest).media_of(pipeline.manifest)

    def answer(self, request: Any) -> None:
        pb, sender = self.pb, request.get_response_sender()
        try:
            self._answer(request, sender)
        except Exception as exc:  # noqa: BLE001 - every failure is this request's error response
            if not isinstance(exc, InputError):
                log.exception("request failed")
            sender.send(pb.InferenceResponse(error=triton_error(pb, exc)),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _answer(self, request: Any, sender: Any) -> None:
        pb = self.pb
        value = _reader(pb, request)
        prompt = _text(value("prompt"), "prompt")
        stream = bool(value("stream", False))
        send_piece: Callable[[int, str], None] | None = None
        if stream:
            def send_piece(row: int, delta: str) -> None:
                sender.send(pb.InferenceResponse(output_tensors=[_strings(pb, "text", delta)]))
        with _medium(self.media, value("image"), value("video")) as (kind, medium):
            max_tokens = int(value("max_tokens", DEFAULT_MAX_TOKENS))
            if max_tokens < 1:
                raise InputError(f"max_tokens {max_tokens} must be at least 1", "send max_tokens >= 1")
            seed = value("seed")
            result = self.pipeline.generate(**{kind: medium}, prompt=prompt, max_new_tokens=max_tokens,
                                            temperature=float(value("temperature", 0.0)),
                                            top_p=float(value("top_p", 1.0)),
                                            seed=None if seed is None else int(seed), stream=send_piece)
        sender.send(pb.InferenceResponse(output_tensors=_outputs(pb, result, "" if stream else result.text)),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _reader(pb: ModuleType, request: Any) -> Callable[..., Any]:
    def value(name: str, default: Any = None) -> Any:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            return default
        array = tensor.as_numpy().reshape(-1)
        if array.size != 1:
            raise InputError(f"input {name} has {array.size} elements", f"send one {name} per request")
        return array[0]
    return value


def _text(raw: Any, name: str) -> str:
    if raw is None:
        raise InputError(f"the request has no {name}", f"send {name} as a BYTES tensor of shape [1]")
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not UTF-8 text ({exc})", f"send {name} encoded as UTF-8") from exc


class _medium:
    """The request's image bytes, or its video bytes in a temporary file (the family's processor reads files;
    ``.npy`` frame arrays are recognised by their magic), removed when the request ends."""

    def __init__(self, media: str, image: Any, video: Any) -> None:
        self.media, self.image, self.video, self.path = media, image, video, None

    def __enter__(self) -> tuple[str, Any]:
        if (self.image is None) == (self.video is None):
            raise InputError("send exactly one of image and video", f"this artifact takes {self.media} bytes")
        if self.image is not None:
            return "image", bytes(self.image)
        data = bytes(self.video)
        handle, name = tempfile.mkstemp(suffix=".npy" if data.startswith(NPY_MAGIC) else ".mp4",
                                        prefix="apet-triton-video-")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        self.path = Path(name)
        return "video", str(self.path)

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _strings(pb: ModuleType, name: str, text: str) -> Any:
    return pb.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def _outputs(pb: ModuleType, result: Result, text: str) -> list[Any]:
    keep = np.asarray(result.keep_index, dtype=np.int64)
    return [_strings(pb, "text", text),
            pb.Tensor("token_ids", np.asarray(result.token_ids, dtype=np.int64)),
            pb.Tensor("keep_index", keep.reshape(1, -1) if keep.ndim == 1 else keep.reshape(keep.shape[0], -1)),
            pb.Tensor("prompt_tokens", np.array([result.stats.prompt_tokens[0]], dtype=np.int64)),
            pb.Tensor("completion_tokens", np.array([len(result.token_ids)], dtype=np.int64)),
            _strings(pb, "finish_reason", result.finish_reason)]


class TritonPythonModel:
    """Triton's entry point (``1/model.py`` imports this class)."""

    def initialize(self, args: dict[str, Any]) -> None:
        pb = triton_utils()
        params = parameters(model_config(args))
        artifact = version_dir(args) / params.get("artifact", "artifact")
        vision_model = params.get("vision_model", "")
        vision_copy = Path(args["model_repository"]).parent / vision_model / "1" / "model.onnx" \
            if vision_model else None
        manifest = check_artifact(artifact, params.get("manifest_digest", ""), vision_copy)
        backend = make_backend(params.get("backend", "auto"), artifact, manifest, device_of(args))
        if vision_model:
            graph = manifest.graphs["vision"]
            route_vision(backend, bls_vision(pb, vision_model, graph), graph)
        self.generation = Generation(pb, Pipeline(artifact, manifest, backend))
        log.info("apet generation model ready: %s (%s)", artifact, backend.name)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:  # decoupled: answers go through each request's sender
            self.generation.answer(request)
        return None

    def finalize(self) -> None:
        self.generation = None  # type: ignore[assignment]
