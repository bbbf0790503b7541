"""The artifact directory's schema: versioned ``manifest.json`` (docs/architecture.md).

Every later command reads only the artifact directory, through
:func:`read_manifest`, which validates the schema version, the types, that
every path stays inside the directory, the manifest's own digest (so an
edited manifest is refused, not run) and, on request, the checksums of every
file. Any malformed manifest raises :class:`ArtifactError`, never another
exception.

An export or build replaces the files of an existing artifact one rename at a time, the manifest (or the
build report) last (:func:`apet.atomic.replace_files`). Readers that take more than the manifest go through
:func:`consistent_read`: the read is accepted only if no file it depends on changed while it ran and no
commit was under way; otherwise it is repeated, and after a few attempts it raises
:class:`ArtifactChangedError` (retryable). So a reader gets the old set, the new set, or that error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, TypeVar

from apet.contracts.cache import CacheLayout
from apet.contracts.files import BUILD_OUTPUTS, MANIFEST_NAME, REPORT_NAME, sha256_file
from apet.contracts.io import KV_CACHE_FORMS
from apet.contracts.plan import CompressionPlan
from apet.contracts.specs import DecoderSpec, ModelSpec
from apet.contracts.targets import ATTENTION_FORMS, DEFAULT_TARGET, ExportForm
from apet.contracts.weights import WeightSpec
from apet.errors import ArtifactChangedError, ArtifactError

SCHEMA_VERSION = 2
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphEntry:
    file: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    external_data: list[str] = field(default_factory=list)
    weight_bytes: int = 0  # the graph's initializers as stored (INT4 packed): what quantization shrinks


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    apet_version: str
    created: str
    model: ModelSpec
    dtype: str
    opset: int
    compression: CompressionPlan
    max_batch: int
    max_context: int
    graphs: dict[str, GraphEntry]
    embeddings: dict[str, Any]
    text_assets: list[str]
    checksums: dict[str, str]
    weights: WeightSpec = field(default_factory=WeightSpec)  # the LLM graph's weight format (fp16 = as dtype)
    digest: str = ""  # SHA-256 of this manifest's canonical JSON without the digest (see content_digest)
    target: str = DEFAULT_TARGET  # absent from manifests written before --target: those are pattern / opset 17
    attention: str = "pattern"
    # the LLM's KV-cache form (apet.contracts.io.KV_CACHE_FORMS): "dynamic" = llm.onnx, the cache grows by
    # concatenation (manifests written before the field); "static" = llm_prefill.onnx + llm_decode.onnx over
    # preallocated caches
    kv_cache: str = "dynamic"

    # -- derived -----------------------------------------------------------------------------------
    @property
    def visual_tokens(self) -> int:
        """Tokens per image (view, frame) at the LLM input after stage 1 (K1)."""
        return self.compression.stage1_keep

    def removed_at_stage2(self) -> int:
        return self.compression.removed_at_stage2

    @property
    def export_form(self) -> ExportForm:
        """Target, attention form and opset the graphs were written for (what a builder must parse)."""
        return ExportForm(self.target, self.attention, self.opset)

    @property
    def cache_layout(self) -> CacheLayout:
        return CacheLayout.of(self.model.decoder.num_layers, self.compression)

    def extra_token_ids(self) -> dict[str, int]:
        """Ids of the learned rows appended to the embedding table (e.g. ``image_newline``)."""
        return {str(k): int(v) for k, v in (self.embeddings.get("extra_rows") or {}).items()}

    def files(self) -> list[str]:
        """Every file the artifact consists of (relative), manifest excluded."""
        names = [g.file for g in self.graphs.values()] + [x for g in self.graphs.values() for x in g.external_data]
        if self.embeddings.get("file"):
            names.append(self.embeddings["file"])
        if self.weights.scales_file:
            names.append(self.weights.scales_file)
        return sorted(set(names + list(self.text_assets)))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["compression"] = self.compression.to_json()
        data["weights"] = self.weights.to_json()
        return data


def in_memory_manifest(model: ModelSpec, plan: CompressionPlan, *, dtype: str, max_batch: int,
                       max_context: int, extra_rows: dict[str, int] | None = None) -> Manifest:
    """A manifest for running a checkpoint directly (evaluation over many budgets, benchmarks): no
    graphs, no files, the model's own spec and one compression plan; ``extra_rows`` are the ids of the
    family's learned rows in the torch backend's table (``adapter.extra_row_ids()``)."""
    import datetime as dt

    from apet import __version__

    return Manifest(SCHEMA_VERSION, __version__, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    model, dtype, 0, plan, max_batch, max_context, {}, {"extra_rows": dict(extra_rows or {})}, [], {})


def _safe_relative(name: Any, what: str) -> str:
    """Reject absolute paths and '..' so a manifest can never point outside its directory."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"manifest field {what} must be a non-empty relative path, got {name!r}",
                            "re-export the artifact")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or name.startswith("~") or ":" in pure.parts[0]:
        raise ArtifactError(f"manifest path {name!r} ({what}) escapes the artifact directory",
                            "the manifest was edited or is malicious; re-export the artifact")
    return name


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, Mapping) or key not in data:
        raise ArtifactError(f"manifest is missing {where}{key}", "re-export the artifact with this apet version")
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise ArtifactError(f"manifest field {where}{key} has type {type(value).__name__}",
                            "re-export the artifact; the manifest is corrupt")
    return value


def _model_from_json(data: Mapping[str, Any]) -> ModelSpec:
    decoder = _require(data, "decoder", dict, "model.")
    processor = _require(data, "processor", dict, "model.")
    try:
        return ModelSpec(
            family=_require(data, "family", str, "model."), source=str(data.get("source", "")),
            n_tokens=_require(data, "n_tokens", int, "model."),
            patch_grid=tuple(_require(data, "patch_grid", list, "model.")),
            vision_dim=_require(data, "vision_dim", int, "model."),
            image_token_id=_require(data, "image_token_id", int, "model."),
            bos_token_id=data.get("bos_token_id"), eos_token_ids=tuple(_require(data, "eos_token_ids", list, "model.")),
            pad_token_id=data.get("pad_token_id"), prompt_template=_require(data, "prompt_template", str, "model."),
            image_placeholder=_require(data, "image_placeholder", str, "model."),
            decoder=DecoderSpec(**decoder),
            processor=dict(processor),
            extra=dict(data.get("extra") or {}),
            prompt_template_name=str(data.get("prompt_template_name", "custom")),
        )
    except TypeError as exc:
        raise ArtifactError(f"manifest model section is malformed: {exc}", "re-export the artifact") from exc


def _compression_from_json(data: Mapping[str, Any]) -> CompressionPlan:
    try:
        plan = CompressionPlan.from_json(data)
        plan.stage1.validate(plan.stage1.keep)
        if plan.stage2 is not None:
            plan.stage2.compression.validate(plan.stage2.span)
        return plan
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"manifest section compression is malformed ({exc})", "re-export the artifact") from exc


def _graph_from_json(name: str, data: Mapping[str, Any]) -> GraphEntry:
    where = f"graphs.{name}."
    entry = GraphEntry(
        file=_safe_relative(_require(data, "file", str, where), where + "file"),
        inputs=_require(data, "inputs", list, where), outputs=_require(data, "outputs", list, where),
        external_data=[_safe_relative(x, where + "external_data") for x in data.get("external_data", [])],
        weight_bytes=int(data.get("weight_bytes", 0) or 0),
    )
    for spec in entry.inputs + entry.outputs:
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or \
                not isinstance(spec.get("shape"), list):
            raise ArtifactError(f"manifest {where}inputs/outputs entry {spec!r} is malformed", "re-export the artifact")
    return entry


def content_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no whitespace) without its ``digest`` field."""
    body = {k: v for k, v in data.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sign(data: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest JSON with its digest set (what :func:`write_manifest` writes)."""
    normal = json.loads(json.dumps({k: v for k, v in data.items() if k != "digest"}))
    return {**normal, "digest": content_digest(normal)}


def _check_digest(data: Mapping[str, Any]) -> None:
    digest = data.get("digest")
    if not isinstance(digest, str) or not digest:
        raise ArtifactError("manifest.json has no digest (written by an older apet, or edited)",
                            "re-export the artifact with this apet version")
    try:
        actual = content_digest(data)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest.json cannot be canonicalised ({exc})", "re-export the artifact") from exc
    if actual != digest:
        raise ArtifactError("manifest.json changed after export (its digest does not match its content)",
                            "re-export the artifact; never edit manifest.json by hand")


def _weights_from_json(data: Any) -> WeightSpec:
    """The weight format; manifests written before quantization existed are fp16."""
    from apet.errors import UsageError

    if data is not None and not isinstance(data, Mapping):
        raise ArtifactError("manifest field weights is not an object", "re-export the artifact")
    try:
        spec = WeightSpec.from_json(data)
    except (UsageError, TypeError) as exc:
        raise ArtifactError(f"manifest section weights is malformed ({exc})", "re-export the artifact") from exc
    if spec.scales_file is not None:
        _safe_relative(spec.scales_file, "weights.scales_file")
    return spec


def _form(data: Mapping[str, Any], field: str, default: str, allowed: tuple[str, ...]) -> str:
    """A graph-form field (``attention``, ``kv_cache``): manifests written before it existed have ``default``."""
    form = data.get(field, default)
    if form not in allowed:
        raise ArtifactError(f"manifest field {field} is {form!r}, not one of {', '.join(allowed)}",
                            "re-export the artifact")
    return form


def manifest_from_json(data: Any) -> Manifest:
    """Validate and build a Manifest from parsed JSON; only ArtifactError escapes."""
    if not isinstance(data, Mapping):
        raise ArtifactError("manifest.json is not a JSON object", "re-export the artifact")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"manifest schema_version {version!r} is not supported by this apet (expects {SCHEMA_VERSION})",
            "re-export the artifact with this apet version, or install the apet version that wrote it",
        )
    try:
        graphs = _require(data, "graphs", dict, "")
        embeddings = _require(data, "embeddings", dict, "")
        if embeddings.get("file") is not None:
            _safe_relative(embeddings["file"], "embeddings.file")
        checksums = _require(data, "checksums", dict, "")
        for key, value in checksums.items():
            _safe_relative(key, "checksums")
            if not isinstance(value, str):
                raise ArtifactError(f"checksum of {key!r} is not a string", "re-export the artifact")
        manifest = Manifest(
            schema_version=version, apet_version=str(data.get("apet_version", "")),
            created=str(data.get("created", "")), model=_model_from_json(_require(data, "model", dict, "")),
            dtype=_require(data, "dtype", str, ""), opset=_require(data, "opset", int, ""),
            compression=_compression_from_json(_require(data, "compression", dict, "")),
            max_batch=_require(data, "max_batch", int, ""), max_context=_require(data, "max_context", int, ""),
            graphs={str(k): _graph_from_json(str(k), _require(graphs, k, dict, "graphs.")) for k in graphs},
            embeddings=dict(embeddings),
            text_assets=[_safe_relative(x, "text_assets") for x in _require(data, "text_assets", list, "")],
            checksums={str(k): str(v) for k, v in checksums.items()},
            weights=_weights_from_json(data.get("weights")),
            target=str(data.get("target", DEFAULT_TARGET)),
            attention=_form(data, "attention", "pattern", ATTENTION_FORMS),
            kv_cache=_form(data, "kv_cache", "dynamic", KV_CACHE_FORMS),
        )
        _check_digest(data)
        return replace(manifest, digest=str(data["digest"]))
    except ArtifactError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ArtifactError(f"manifest.json is malformed: {exc}", "re-export the artifact") from exc


def read_manifest(artifact_dir: Path, *, verify_checksums: bool = False) -> Manifest:
    """Load ``artifact_dir/manifest.json``; optionally check every file's SHA-256 against it (then as one
    :func:`consistent_read`: a check that overlaps a replacement is repeated, never reported as corruption)."""
    if verify_checksums:
        return consistent_read(artifact_dir, lambda: _read_manifest(artifact_dir, verify_checksums=True))
    return _read_manifest(artifact_dir)


def _read_manifest(artifact_dir: Path, *, verify_checksums: bool = False) -> Manifest:
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir} has no {MANIFEST_NAME}",
                            "pass the directory apet-export wrote (apet-export --out DIR)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", "re-export the artifact") from exc
    manifest = manifest_from_json(data)
    if verify_checksums:
        verify_files(artifact_dir, manifest)
    return manifest


def verify_files(artifact_dir: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Raise ArtifactError for a missing file or a SHA-256 that differs from the manifest's."""
    for name in names if names is not None else sorted(manifest.checksums):
        path = Path(artifact_dir) / name
        if not path.is_file():
            raise ArtifactError(f"{name} is missing from {artifact_dir}", "re-export the artifact")
        expected = manifest.checksums.get(name)
        if expected is not None and sha256_file(path) != expected:
            raise ArtifactError(f"{name} changed after export (checksum mismatch)",
                                "re-export the artifact; do not edit exported files in place")


# -- reading while a writer replaces files ------------------------------------------------------------------
READ_ATTEMPTS = 8  # with the back-off below, ~5 s: a commit only renames files, it takes milliseconds
T = TypeVar("T")
_inside = threading.local()


def _listed(artifact: Path, raw: bytes | None) -> list[str]:
    """The files a manifest's bytes name (best effort: a broken manifest is the reader's error to report)."""
    try:
        names = list(json.loads(raw or b"{}").get("checksums") or {})
    except (ValueError, AttributeError, TypeError, RecursionError):
        return []
    safe = []
    for name in names:
        try:
            safe.append(_safe_relative(name, "checksums"))
        except ArtifactError:
            continue
    return safe


def _stat(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def content_state(artifact: Path) -> tuple:
    """The manifest's bytes and the identity of every file it lists: apet replaces files by rename, never in
    place, so a replaced file has another inode (and ctime). Equal states before and after a read mean the read
    saw one version."""
    artifact = Path(artifact)
    raw = _read_bytes(artifact / MANIFEST_NAME)
    return raw, tuple((name, _stat(artifact / name)) for name in _listed(artifact, raw))


def artifact_state(artifact: Path) -> tuple:
    """:func:`content_state` plus the engines and build report, and whether a commit is under way."""
    from apet.atomic import COMMIT_MARK

    artifact = Path(artifact)
    committing = sorted(p.name for p in artifact.glob(f"{COMMIT_MARK}*")) if artifact.is_dir() else []
    return (content_state(artifact), _read_bytes(artifact / REPORT_NAME),
            tuple((name, _stat(artifact / name)) for name in BUILD_OUTPUTS if name != REPORT_NAME), tuple(committing))


def consistent_read(artifact: Path, read: Callable[[], T], *, attempts: int = READ_ATTEMPTS) -> T:
    """``read()`` the artifact so that it sees one version of its files, or raise :class:`ArtifactChangedError`.

    The read is repeated while an export or build commits or when any file it depends on changed during it
    (whatever it raised then: half-replaced files fail in many ways). A read that fails on a stable artifact
    raises its own error (a corrupt or stale artifact). Nested calls run ``read`` once; the outermost retries.
    """
    if getattr(_inside, "active", False):
        return read()
    artifact = Path(artifact)
    _inside.active = True
    try:
        for attempt in range(attempts):
            before = artifact_state(artifact)
            try:
                result = read()
                failure: BaseException | None = None
            except Exception as exc:  # judged below: retried if the files changed
                failure = exc
            after = artifact_state(artifact)
            if before == after and not after[-1]:
                if failure is not None:
                    raise failure
                return result
            log.debug("%s changed while it was read (attempt %d): reading again", artifact, attempt + 1)
            time.sleep(min(0.05 * 2 ** attempt, 1.0))
    finally:
        _inside.active = False
    raise ArtifactChangedError(f"{artifact} changed while it was read: an apet-export or apet-build was replacing "
                               "its files", "retry in a moment; if this persists, an export or build was killed while "
                               "committing: run it again")


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write manifest.json (with its digest) atomically (temp file + rename)."""
    from apet.atomic import write_atomic

    return write_atomic(Path(directory) / MANIFEST_NAME, json.dumps(sign(manifest.to_json()), indent=1) + "\n")
