"""Run one request through every runner with Polygraphy's ``Comparator.run`` and compare each runner with the
first (the reference), stage by stage (:mod:`apet.check.report`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apet import scopes
from apet.check.graph import extract_scope, is_stage, scope_of_tensor
from apet.check.margins import stage_margins
from apet.check.report import CheckReport, Comparison
from apet.check.runners import (
    NODE_PREFIX,
    SPAN_START,
    Request,
    artifact_processor,
    make_backend_runner,
    make_onnxrt_runner,
    polygraphy,
)
from apet.contracts.comparison import DEFAULT_TOLERANCE, StageRow, Tolerance, compare_outputs, token_diff
from apet.contracts.compression import CompressionConfig, Stage2Config
from apet.errors import UsageError
from apet.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


@dataclass
class RunnerSpec:
    backend: str  # onnxruntime | tensorrt | torch
    artifact: Path
    device: str | None = None
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckConfig:
    runners: list[RunnerSpec]
    image: Any = None
    video: Any = None
    prompt: str = "Describe the image."
    steps: int = 8
    per_layer: bool = False
    atol: float | None = None
    rtol: float | None = None
    reduce_dir: Path | None = None  # where the reduced ONNX of the first departing scope is written
    verify_checksums: bool = True


def _request(manifest: Manifest, artifact: Path, config: CheckConfig) -> Request:
    processor = artifact_processor(artifact, manifest)
    medium = config.image if config.video is None else config.video
    if medium is None:
        raise UsageError("apet check needs the request's media", "pass --image or --video")
    if config.video is None and isinstance(medium, (str, Path)):
        from apet.media.images import load_image

        medium = load_image(str(medium))
    return Request(processor.vision_inputs([medium]), config.prompt, config.steps)


def _runner(spec: RunnerSpec, manifest: Manifest, request: Request, per_layer: bool):
    label = spec.label or f"{spec.backend}:{Path(spec.artifact).name}"
    if spec.backend == "onnxruntime":
        return make_onnxrt_runner(spec.artifact, manifest, request, spec.device or "cpu", per_layer, label)
    options = dict(spec.options)
    if spec.backend == "torch":
        # the HF-module reference, on a GPU too (its static CUDA-graph path hides stage 1's input features)
        options.setdefault("torch_mode", "reference")
    return make_backend_runner(spec.backend, spec.artifact, manifest, request, spec.device, label, **options)


def tolerance_for(manifests: list[Manifest], atol: float | None, rtol: float | None) -> Tolerance:
    loosest = DEFAULT_TOLERANCE["fp16" if any(m.dtype == "fp16" for m in manifests) else "fp32"]
    return Tolerance(loosest.atol if atol is None else atol, loosest.rtol if rtol is None else rtol)


def check(config: CheckConfig, keep_outputs: bool = False):
    """The report (and, with ``keep_outputs``, every runner's outputs by label) of one request."""
    if len(config.runners) < 2:
        raise UsageError("apet check compares at least two runners",
                         "pass two backends (--backends onnxruntime,torch) or another artifact (--against)")
    manifests = [read_manifest(s.artifact, verify_checksums=config.verify_checksums) for s in config.runners]
    request = _request(manifests[0], config.runners[0].artifact, config)
    runners = [_runner(s, m, request, config.per_layer) for s, m in zip(config.runners, manifests)]
    logger = polygraphy("logger").G_LOGGER
    logger.module_severity = logger.ERROR  # the report is the output; Polygraphy's own lines are noise here
    comparator = polygraphy("comparator").Comparator
    results = comparator.run(runners, data_loader=[dict(request.inputs.arrays)])
    outputs = {name: dict(iterations[0]) for name, iterations in results.items()}
    tol = tolerance_for(manifests, config.atol, config.rtol)
    names = [r.name for r in runners]
    comparisons = [_compare(names[0], outputs[names[0]], name, outputs[name], tol, manifests[0], spec, config)
                   for name, spec in zip(names[1:], config.runners[1:])]
    report = CheckReport(names, {"atol": tol.atol, "rtol": tol.rtol}, config.per_layer, comparisons)
    return (report, outputs) if keep_outputs else report


def _compare(ref_name: str, ref: dict, name: str, out: dict, tol: Tolerance, manifest: Manifest,
             spec: RunnerSpec, config: CheckConfig) -> Comparison:
    keys = [k for k in ref if not k.startswith((NODE_PREFIX, SPAN_START))]
    rows = list(compare_outputs(ref, out, tol, keys).values())
    first, tensor = next((r.stage for r in rows if not r.passed), None), None
    if config.per_layer:
        # only the stage scopes: a dtype's own constants (the mask's fill value, fp16 vs fp32) are no departure
        tensor = next((k for k in ref if k.startswith(NODE_PREFIX) and k in out and _in_stage(k)
                       and np.shape(ref[k]) == np.shape(out[k]) and not tol.close(out[k], ref[k])), None)
        if tensor is not None:
            first = scope_of_tensor(tensor.split(":", 2)[2]) or first
    comparison = Comparison(ref_name, name, rows, first, tensor)
    plan = manifest.compression
    if plan is not None:
        comparison.margins = _margins(ref, out, manifest)
        stage2_row = next((r for r in rows if r.stage == scopes.APET_STAGE2), None)
        if stage2_row is not None and plan.stage2 is not None:
            _span_metrics(stage2_row, ref, out, plan.stage2)
    if first is not None and config.reduce_dir is not None and tensor is not None:
        graph = tensor.split(":", 2)[1]
        artifact = Path(spec.artifact)
        path = artifact / read_manifest(artifact, verify_checksums=False).graphs[graph].file
        try:
            comparison.reduced_onnx = str(extract_scope(path, first, Path(config.reduce_dir) / f"{first}.onnx"))
        except Exception as exc:  # noqa: BLE001 - the report stands without its attachment; say why
            log.warning("could not extract scope %s of %s: %s", first, path, exc)
    return comparison


def _in_stage(key: str) -> bool:
    scope = scope_of_tensor(key.split(":", 2)[2])
    return scope is not None and is_stage(scope)


def _margins(ref: dict, out: dict, manifest: Manifest) -> dict[str, Any]:
    """Stage-1 margins on each runner's own stage-1 input (the ``vision`` output) and stage-2 margins on its
    stage-2 input (the image span of layer L-1's output), with the choices that changed and their gaps. A runner
    that does not expose a stage's input (a TensorRT engine) has none; the other side's still show near-ties."""
    plan = manifest.compression
    result = _stage_report(ref.get("vision"), out.get("vision"), plan.stage1)
    if plan.stage2 is not None:
        stage2 = _stage_report(_stage2_input(ref, plan.stage2), _stage2_input(out, plan.stage2),
                               plan.stage2.compression)
        if stage2["reference"] or stage2["candidate"]:
            result["stage2"] = stage2
    return result


def _stage2_input(run: dict, stage2: Stage2Config) -> np.ndarray | None:
    """[B, K1, D]: each row's image span of the residual stream that stage 2 compresses."""
    hidden, starts = run.get(f"layers.{stage2.layer - 1}"), run.get(SPAN_START)
    if hidden is None or starts is None:
        return None
    return np.stack([h[int(s): int(s) + stage2.span] for h, s in zip(np.asarray(hidden), np.asarray(starts))])


def _stage_report(ref: np.ndarray | None, out: np.ndarray | None, stage: CompressionConfig) -> dict[str, Any]:
    start = stage.seed if isinstance(stage.seed, int) else 0
    result: dict[str, Any] = {"reference": [], "candidate": [], "merge_target_changes": []}
    if stage.placement == "rank":
        result["basis_slot_changes"] = []
    per_side = [[stage_margins(x, stage.keep, stage.basis, start, stage.placement) for x in np.asarray(side)]
                if side is not None else [] for side in (ref, out)]
    result["reference"] = [m.to_json() for m in per_side[0]]
    result["candidate"] = [m.to_json() for m in per_side[1]]
    for row, (ma, mb) in enumerate(zip(*per_side)):
        for j in sorted(set(ma.merge_targets) & set(mb.merge_targets)):
            if ma.merge_targets[j] != mb.merge_targets[j]:
                result["merge_target_changes"].append(
                    {"row": row, "token": j, "reference_target": ma.merge_targets[j],
                     "candidate_target": mb.merge_targets[j], "reference_gap": ma.merge_gaps[j],
                     "candidate_gap": mb.merge_gaps[j]})
        for p in sorted(set(ma.basis_slots) & set(mb.basis_slots)) if stage.placement == "rank" else ():
            if ma.basis_slots[p] != mb.basis_slots[p]:
                result["basis_slot_changes"].append(
                    {"row": row, "token": p, "reference_basis": ma.basis_slots[p],
                     "candidate_basis": mb.basis_slots[p], "reference_rank": ma.kept.index(p),
                     "candidate_rank": mb.kept.index(p), "reference_error": ma.errors[p],
                     "candidate_error": mb.errors[p]})
    return result


def _span_metrics(row: StageRow, ref: dict, out: dict, stage2: Stage2Config) -> None:
    """Split the ``apet_stage2`` row into the K2 kept rows of each image span (where ApET's choices show) and
    the rows outside it (text and response tokens, which only carry the layers' rounding)."""
    starts = ref.get(SPAN_START)
    a, b = np.asarray(ref[scopes.APET_STAGE2]), np.asarray(out[scopes.APET_STAGE2])
    if starts is None or a.shape != b.shape or not np.array_equal(starts, out.get(SPAN_START)):
        return
    inside = np.zeros(a.shape[:2], dtype=bool)
    for i, s in enumerate(np.asarray(starts)):
        inside[i, int(s): int(s) + stage2.keep] = True
    row.metrics["span_token_diff"] = token_diff(b[inside], a[inside])
    outside = np.abs(b[~inside].astype(np.float64) - a[~inside])
    row.metrics["outside_span_max_abs"] = float(outside.max()) if outside.size else 0.0
