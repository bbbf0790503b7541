"""Write a Triton model repository from an artifact (``apet triton ART --out REPO``; layout in docs/triton.md).

The artifact is placed *inside* the repository (``apet_generate/1/artifact/``, the vision file in
``apet_vision/1/``), hard-linked where the filesystem allows and copied otherwise, never symlinked:

* Triton and KServe pull a repository from object storage or a volume as one tree; a link to a path on the
  machine that wrote it would not exist on the serving node;
* apet-export/apet-build replace an artifact's files by rename (DESIGN §3), so a hard link keeps the version the
  repository was written from, whole, while the original artifact moves on; and it costs no disk;
* the generation model checks that copy against the manifest's checksums and digest at load, so a repository that
  was edited or mixed with another artifact refuses to load instead of answering from the wrong weights.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from apet import __version__
from apet.atomic import place_file
from apet.contracts.files import ENGINE_FILES, MANIFEST_NAME, REPORT_NAME
from apet.errors import ArtifactError, UsageError, option
from apet.manifest import Manifest, read_manifest
from apet.triton.configs import GENERATION_MODEL, VISION_MODEL, Scaling, generation_config, vision_config
from apet.triton.pbtxt import render

log = logging.getLogger(__name__)

ARTIFACT_DIR = "artifact"  # inside the generation model's version directory
MODEL_PY = '''"""Written by `apet triton` (apet {version}): the {what}.

The code is apet's own ({module}), so the Python that runs Triton's Python backend needs apet installed
(pip install apet; docs/triton.md).
"""

from {module} import TritonPythonModel  # noqa: F401
'''


@dataclass
class RepositoryReport:
    path: Path
    vision_form: str
    models: list[str] = field(default_factory=list)
    linked: int = 0  # files hard-linked from the artifact
    copied: int = 0  # files copied (another filesystem)


def vision_form_of(artifact: Path, form: str) -> str:
    """``auto``: the TensorRT plan when apet-build made one, else the ONNX graph for ONNX Runtime."""
    if form != "auto":
        if form == "tensorrt_plan" and not (artifact / ENGINE_FILES["vision"]).is_file():
            raise UsageError(f"{artifact} has no {ENGINE_FILES['vision']} for the tensorrt_plan vision form",
                             f"build it with apet-build {artifact}, or pass {option('vision_form', 'auto')}")
        return form
    return "tensorrt_plan" if (artifact / ENGINE_FILES["vision"]).is_file() else "onnxruntime_onnx"


def _place(source: Path, target: Path, report: RepositoryReport) -> None:
    if place_file(source, target, otherwise="copy") == "linked":
        report.linked += 1
    else:  # another filesystem, or links not allowed there
        report.copied += 1


def _artifact_files(artifact: Path, manifest: Manifest) -> list[str]:
    """The manifest, every file it lists, and the engines and build report when built."""
    built = [name for name in (REPORT_NAME, *ENGINE_FILES.values()) if (artifact / name).is_file()]
    return [MANIFEST_NAME, *manifest.files(), *built]


def write_repository(artifact: str | Path, out: str | Path, scaling: Scaling = Scaling(),
                     vision_form: str = "auto", backend: str = "auto") -> RepositoryReport:
    """Write the repository at ``out`` (which must not exist or be empty); checks the artifact's checksums
    first, so a repository is never made from a damaged artifact."""
    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact, verify_checksums=True)
    scaling.check(manifest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory", "pass a new --out directory")
    form = vision_form_of(artifact, vision_form)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed into place when whole
    try:
        report = RepositoryReport(out, form)
        _write_vision(artifact, manifest, staging / VISION_MODEL, form, scaling, report)
        _write_generation(artifact, manifest, staging / GENERATION_MODEL, scaling, backend, report)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s (%d files linked, %d copied)", out, report.linked, report.copied)
    return report


def _write_vision(artifact: Path, manifest: Manifest, model_dir: Path, form: str, scaling: Scaling,
                  report: RepositoryReport) -> None:
    graph = manifest.graphs["vision"]
    version = model_dir / "1"
    parameters = None
    if form == "tensorrt_plan":
        _place(artifact / ENGINE_FILES["vision"], version / "model.plan", report)
    else:
        _place(artifact / graph.file, version / "model.onnx", report)
        for name in graph.external_data:  # ONNX external data is found beside the graph, by its own name
            _place(artifact / name, version / name, report)
    if form == "python":
        (version / "model.py").write_text(MODEL_PY.format(version=__version__, what="vision model (ONNX Runtime)",
                                                          module="apet.triton.vision_model"))
        checksum = manifest.checksums.get(graph.file)
        if checksum is None:
            raise ArtifactError(f"the manifest has no checksum for {graph.file}", "re-export the artifact")
        parameters = {"sha256": checksum}
    (model_dir / "config.pbtxt").write_text(render(vision_config(manifest, form, scaling, parameters)) + "\n")
    report.models.append(VISION_MODEL)


def _write_generation(artifact: Path, manifest: Manifest, model_dir: Path, scaling: Scaling, backend: str,
                      report: RepositoryReport) -> None:
    version = model_dir / "1"
    for name in _artifact_files(artifact, manifest):
        _place(artifact / name, version / ARTIFACT_DIR / name, report)
    (version / "model.py").write_text(MODEL_PY.format(version=__version__, what="generation model (decoupled)",
                                                      module="apet.triton.generation_model"))
    engines = (artifact / ENGINE_FILES["llm"]).is_file()
    parameters = {"artifact": ARTIFACT_DIR, "manifest_digest": manifest.digest, "vision_model": VISION_MODEL,
                  "backend": backend}
    config = generation_config(scaling, gpu=engines, parameters=parameters)
    (model_dir / "config.pbtxt").write_text(render(config) + "\n")
    report.models.append(GENERATION_MODEL)
