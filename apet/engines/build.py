"""``apet-build``: the artifact's ONNX graphs become engines, a report, and trtexec lines."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from apet.atomic import replace_files, write_atomic
from apet.contracts.files import ENGINE_FILES, REPORT_NAME, layers_file, manifest_digest, read_report, sha256_bytes
from apet.contracts.onnx_graph import nodes_by_stage
from apet.contracts.targets import builder_problem
from apet.engines.api import TrtApi, load_api
from apet.engines.build_dir import build_target
from apet.engines.layer_counts import engine_layers_by_stage
from apet.engines.profiles import ShapeLimits, check_workspace, llm_profiles, vision_profiles
from apet.engines.trt import BuildOptions, BuiltEngine, Profile, build_engine
from apet.errors import ArtifactChangedError, ArtifactError, UsageError
from apet.interrupts import deferred_interrupts
from apet.manifest import Manifest, consistent_read, content_state, read_manifest, verify_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    """What ``apet-build`` takes."""

    artifact: Path
    backend: str = "auto"
    max_batch: int | None = None
    max_context: int | None = None
    max_prompt: int | None = None
    workspace_mb: int | None = None
    optimization_level: int | None = None
    compute_capabilities: tuple[str, ...] = ()
    timing_cache: Path | None = None
    graphs: tuple[str, ...] = ("vision", "llm")
    overwrite: bool = False
    out: Path | None = None  # build into this directory of the export's files instead (build_dir.py)

    def __post_init__(self) -> None:
        unknown = set(self.graphs) - set(ENGINE_FILES)
        if unknown:
            raise UsageError(f"unknown graphs {sorted(unknown)}", f"choose from {', '.join(ENGINE_FILES)}")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise UsageError(f"--builder-optimization-level {self.optimization_level} is outside [0, 5]",
                             "use 0 (fastest build) .. 5 (most tuning); 3 is TensorRT's default")
        check_workspace(self.workspace_mb)


@dataclass
class BuildReport:
    builder: str
    version: str
    created: str
    manifest_sha256: str
    limits: dict[str, int]
    options: dict[str, Any]
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _previous_report(cfg: BuildConfig) -> dict[str, Any] | None:
    """The existing build report; with --overwrite an unreadable one is simply replaced."""
    try:
        return read_report(cfg.artifact)
    except ArtifactError:
        if cfg.overwrite:
            return None
        raise


def _guard_existing(cfg: BuildConfig, digest: str) -> None:
    """Never silently replace engines that belong to a different export."""
    report = _previous_report(cfg)
    existing = [name for name in ENGINE_FILES.values() if (cfg.artifact / name).exists()]
    if not existing or cfg.overwrite:
        return
    if report is None or report.get("manifest_sha256") != digest:
        raise UsageError(f"{cfg.artifact} already holds engines ({', '.join(existing)}) built from another export",
                         "pass --overwrite to replace them")


def _layer_information(api: TrtApi, plan: bytes) -> str | None:
    """Engine inspector JSON; needs a CUDA device to deserialize (absent on CPU-only AOT builds)."""
    if not api.can_deserialize_here():
        return None
    trt = api.module
    try:
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan)
        if engine is None:  # e.g. a TensorRT-RTX engine on a GPU it does not support
            return None
        return engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as exc:  # inspection is a nice-to-have; the build itself succeeded
        log.debug("engine inspection unavailable: %s", exc)
        return None


def _check_builder(manifest: Manifest, api: TrtApi, artifact: Path) -> None:
    """Refuse, before any work, a builder known not to parse the artifact's form (--target)."""
    form = manifest.export_form
    problem = builder_problem(form, api.kind, api.version)
    if problem:
        raise UsageError(f"{problem}: {artifact} was exported with --target {form.target} (--attention "
                         f"{form.attention}, opset {form.opset})",
                         "re-export with apet-export --target jetpack6 (pattern attention, opset 17) for this "
                         "TensorRT, or build with TensorRT >= 10.15 / TensorRT-RTX")


def _profiles(name: str, manifest: Manifest, limits: ShapeLimits) -> list[Profile]:
    if name == "vision":
        return vision_profiles(manifest, limits)
    return llm_profiles(manifest, limits.max_batch, limits.max_context, limits.max_prompt)


def _read_inputs(cfg: BuildConfig) -> tuple[Manifest, str, tuple]:
    """The manifest, its digest and the state of the files the build reads, all of one export."""
    def read() -> tuple[Manifest, str, tuple]:
        state = content_state(cfg.artifact)
        manifest = read_manifest(cfg.artifact)
        if manifest.kv_cache != "dynamic" and "llm" in cfg.graphs:
            raise UsageError(f"apet-build builds the dynamic KV-cache form's llm.onnx; this artifact is --kv-cache "
                             f"{manifest.kv_cache} (for ONNX Runtime)", "pass --graphs vision, or re-export with "
                             "apet-export --kv-cache dynamic")
        for missing in [g for g in cfg.graphs if g not in manifest.graphs]:
            raise ArtifactError(f"the manifest has no {missing} graph", "re-export the artifact")
        onnx_files = [manifest.graphs[g].file for g in cfg.graphs]
        data_files = [x for g in cfg.graphs for x in manifest.graphs[g].external_data]
        verify_files(cfg.artifact, manifest, onnx_files + data_files)
        return manifest, manifest_digest(cfg.artifact), state

    return consistent_read(cfg.artifact, read)


def _stale_files(report: BuildReport, built: tuple[str, ...]) -> set[str]:
    """Plans and layer files that this report does not cover (another export's, or a rebuild without them)."""
    stale = set()
    for name, file in ENGINE_FILES.items():
        if name not in report.engines:
            stale |= {file, layers_file(name)}
        elif name in built and report.engines[name].get("layer_information") is None:
            stale.add(layers_file(name))
    return stale


def build_artifact(cfg: BuildConfig, api: TrtApi | None = None) -> BuildReport:
    """Build every requested engine into ``cfg.artifact`` (or ``cfg.out``); returns the report written."""
    cfg = replace(cfg, artifact=build_target(cfg.artifact, cfg.out), out=None)
    manifest, digest, state = _read_inputs(cfg)
    _guard_existing(cfg, digest)
    api = api or load_api(cfg.backend)
    _check_builder(manifest, api, cfg.artifact)
    limits = ShapeLimits.from_manifest(manifest, cfg.max_batch, cfg.max_context, cfg.max_prompt)
    options = BuildOptions(workspace_mb=cfg.workspace_mb, optimization_level=cfg.optimization_level,
                           compute_capabilities=cfg.compute_capabilities, timing_cache=cfg.timing_cache)
    report = BuildReport(
        builder=api.kind, version=api.version, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        manifest_sha256=digest, limits=limits.__dict__.copy(),
        options={"workspace_mb": cfg.workspace_mb, "optimization_level": cfg.optimization_level,
                 "compute_capabilities": list(cfg.compute_capabilities),
                 "timing_cache": str(cfg.timing_cache) if cfg.timing_cache else None},
    )
    previous = _previous_report(cfg)
    if previous and previous.get("manifest_sha256") == digest:
        report.engines.update({k: v for k, v in previous.get("engines", {}).items() if k not in cfg.graphs})

    # plans and layer files are staged inside the artifact and moved in one rename each, build_report.json last
    # (it carries the manifest's and the plans' SHA-256, so readers never accept a mix); an interrupted or
    # failed build leaves the previous engines and report untouched (DESIGN §3)
    with replace_files(cfg.artifact, last=[REPORT_NAME]) as stage, deferred_interrupts() as stop:
        bar = tqdm(cfg.graphs, desc="apet-build", unit="engine", disable=None)
        for name in bar:
            bar.set_postfix_str(f"{name}: building")

            def progress(phase: str, step: int, steps: int, _name: str = name) -> None:
                bar.set_postfix_str(f"{_name}: {phase} {step}/{steps}" if steps else f"{_name}: {phase}")

            built = build_engine(api, cfg.artifact / manifest.graphs[name].file, _profiles(name, manifest, limits),
                                 options, progress=progress, cancelled=stop.is_set)
            stop.check()
            write_atomic(stage.path / ENGINE_FILES[name], built.plan)
            report.engines[name] = _engine_entry(api, name, built, manifest, stage.path,
                                                 nodes_by_stage(cfg.artifact / manifest.graphs[name].file))
            log.info("built %s in %.1f s (%.1f MB)", ENGINE_FILES[name], built.seconds, len(built.plan) / 1e6)
        bar.close()
        stage.remove = _stale_files(report, cfg.graphs)
        write_atomic(stage.path / REPORT_NAME, json.dumps(report.to_json(), indent=1).encode())
        if content_state(cfg.artifact) != state:
            raise ArtifactChangedError(f"{cfg.artifact} was re-exported while its engines were built; they belong "
                                       "to neither export and were discarded", "run apet-build again")
        stop.check()
    return report


def _engine_entry(api: TrtApi, name: str, built: BuiltEngine, manifest: Manifest, artifact: Path,
                  onnx_nodes: dict[str, int]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "file": ENGINE_FILES[name], "onnx": manifest.graphs[name].file, "seconds": round(built.seconds, 3),
        "bytes": len(built.plan), "sha256": sha256_bytes(built.plan), "num_layers": built.num_layers,
        "inputs": built.inputs, "outputs": built.outputs, "profiles": built.profiles,
        "compute_capabilities": built.compute_capabilities or ["builder default"], "layer_information": None,
        "attention_form": manifest.attention, "fused_layers": built.fused_layers,
        # what the engine sees per scope (vision, apet_stage1, llm layers, apet_stage2, ...): ONNX nodes, the
        # parsed network's layers, and the built engine's layers after fusion (only where a GPU runs the plan)
        "onnx_nodes": onnx_nodes, "parsed_layers": built.parsed_layers,
        "engine_layers": None,
    }
    info = _layer_information(api, built.plan)
    if info is not None:
        layer_file = layers_file(name)
        write_atomic(artifact / layer_file, info.encode())
        entry["layer_information"] = layer_file
        entry["engine_layers"] = engine_layers_by_stage(info)
    return entry
