"""``trtexec`` command lines for the artifact's engines, and a parser for trtexec's JSON exports.

Users on Jetson or a desktop GPU already profile with ``trtexec``; this writes
the exact lines that build each engine with the manifest's profiles and time
it at realistic shapes (prefill at the export's visual-token count, decode at
several past lengths), with the integer inputs (positions, mask, image start)
written as binary files so they are meaningful rather than random.

``python -m apet.engines.trtexec report DIR`` turns ``--exportTimes`` /
``--exportProfile`` JSON into a latency table (median, p90, top-10 layers).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apet.contracts.files import ENGINE_FILES
from apet.contracts.specs import resolve_shape
from apet.engines.profiles import OPT_TEXT_TOKENS, ShapeLimits, llm_profiles, vision_profiles
from apet.engines.trt import Profile
from apet.errors import ArtifactError
from apet.manifest import Manifest, read_manifest

OUT_DIR = "trtexec"
DECODE_PAST = (128, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Run:
    """One profiling run: which engine, profile index, shapes and integer input values."""

    name: str
    engine: str
    profile: int
    shapes: dict[str, tuple[int, ...]]
    int_inputs: dict[str, np.ndarray]


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def _shape_flag(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{_dims(shape)}" for name, shape in shapes.items())


def build_command(onnx_file: str, engine_file: str, profiles: list[Profile], *, workspace_mb: int | None = None,
                  layer_info: str | None = None) -> list[str]:
    """A trtexec build line; several profiles are given by repeating the min/opt/max flags."""
    cmd = ["--onnx=" + onnx_file, "--saveEngine=" + engine_file, "--stronglyTyped", "--profilingVerbosity=detailed"]
    for profile in profiles:
        for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            cmd.append(f"{flag}=" + _shape_flag({n: s[i] for n, s in profile.shapes.items()}))
    if workspace_mb:
        cmd.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if layer_info:
        cmd.append("--exportLayerInfo=" + layer_info)
    return cmd


def profile_command(run: Run, out_dir: str = OUT_DIR, iterations: int = 200) -> list[str]:
    cmd = ["--loadEngine=" + run.engine, f"--profile={run.profile}", "--shapes=" + _shape_flag(run.shapes),
           "--useCudaGraph", "--noDataTransfers", "--separateProfileRun", "--dumpProfile",
           f"--iterations={iterations}", "--warmUp=500", "--avgRuns=10",
           f"--exportTimes={out_dir}/{run.name}.times.json", f"--exportProfile={out_dir}/{run.name}.profile.json"]
    if run.int_inputs:
        cmd.append("--loadInputs=" + ",".join(f"{n}:{out_dir}/inputs/{run.name}.{n}.bin" for n in run.int_inputs))
    return cmd


def _llm_run(name: str, manifest: Manifest, artifact: Path, profile_index: int, seq: int, past: int) -> Run:
    """Batch 1, ``seq`` new tokens after ``past``: shapes from the cache layout, meaningful integer inputs."""
    dims = manifest.cache_layout.dims(1, seq, past)
    shapes = {spec["name"]: resolve_shape(spec, dims) for spec in manifest.graphs["llm"].inputs}
    positions = np.arange(past, past + seq, dtype=np.int64)
    ints = {"position_ids": np.broadcast_to(positions, shapes["position_ids"]).copy(),
            "attention_mask": np.ones((1, past + seq), dtype=np.int64)}
    if "image_start" in shapes:
        ints["image_start"] = np.array([manifest.family.text_before_media(manifest, artifact)], dtype=np.int64)
    return Run(name, ENGINE_FILES["llm"], profile_index, shapes, ints)


def _vision_run(manifest: Manifest, limits: ShapeLimits) -> Run:
    """Batch 1 at the profile's smallest shapes, or at the family's typical request where the vision graph takes
    integer inputs (index bookkeeping must be real, not trtexec's random fill): symbolic dims from those."""
    vision = vision_profiles(manifest, limits)[0]
    ints = manifest.family.profiling_vision_inputs(manifest)
    if not ints:
        return Run("vision_b1", ENGINE_FILES["vision"], 0, {n: s[0] for n, s in vision.shapes.items()}, {})
    specs = manifest.graphs["vision"].inputs
    dims = {"batch": 1}
    for spec in specs:
        if spec["name"] in ints:
            dims.update({d: int(n) for d, n in zip(spec["shape"], ints[spec["name"]].shape) if isinstance(d, str)})
    shapes = {spec["name"]: resolve_shape(spec, dims) for spec in specs}
    return Run("vision_b1", ENGINE_FILES["vision"], 0, shapes, {n: np.ascontiguousarray(a, dtype=np.int64)
                                                               for n, a in ints.items()})


def profiling_runs(manifest: Manifest, limits: ShapeLimits, artifact: Path) -> list[Run]:
    runs = [_vision_run(manifest, limits)]
    _, decode = llm_profiles(manifest, limits.max_batch, limits.max_context, limits.max_prompt)
    prompt = min(limits.max_prompt, manifest.family.typical_visual_tokens(manifest) + OPT_TEXT_TOKENS)
    runs.append(_llm_run(f"prefill_{prompt}", manifest, artifact, 0, prompt, 0))
    shortest = decode.shapes["attention_mask"][0][1] - 1
    for past in sorted({p for p in DECODE_PAST if p < limits.max_context} | {prompt}):
        if past >= shortest:
            runs.append(_llm_run(f"decode_past{past}", manifest, artifact, 1, 1, past))
    return runs


def write_trtexec_script(artifact: Path, limits: ShapeLimits, workspace_mb: int | None = None) -> Path:
    """Write ``trtexec.sh`` and its integer input files into the artifact directory."""
    manifest = read_manifest(artifact)
    inputs_dir = artifact / OUT_DIR / "inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    lines = ["#!/usr/bin/env bash",
             "# Generated by apet-build --emit-trtexec. Builds and profiles this artifact's engines with trtexec.",
             "# BUILD=0 skips the builds (reuse vision.plan/llm.plan from apet-build); TRTEXEC=path overrides;",
             "# SMALL_DEVICE=1 caps the LLM builder workspace for 8 GB devices (notes below the builds).",
             "set -euo pipefail", 'cd "$(dirname "$0")"', 'TRTEXEC="${TRTEXEC:-trtexec}"', f"mkdir -p {OUT_DIR}",
             'if [ "${BUILD:-1}" = "1" ]; then']
    for name, file in ENGINE_FILES.items():
        profiles = vision_profiles(manifest, limits) if name == "vision" else \
            llm_profiles(manifest, limits.max_batch, limits.max_context, limits.max_prompt)
        cmd = build_command(manifest.graphs[name].file, file, profiles, workspace_mb=workspace_mb,
                            layer_info=f"{OUT_DIR}/{name}.layers.json")
        small = " ${SMALL_DEVICE:+--memPoolSize=workspace:1024M}" if name == "llm" and not workspace_mb else ""
        lines.append('  "$TRTEXEC" ' + " ".join(shlex.quote(c) for c in cmd) + small +
                     f" | tee {OUT_DIR}/build_{name}.log")
    lines.append("fi")
    lines += small_device_notes(artifact, manifest, workspace_mb)
    for run in profiling_runs(manifest, limits, artifact):
        for tensor, values in run.int_inputs.items():
            values.tofile(inputs_dir / f"{run.name}.{tensor}.bin")
        cmd = profile_command(run)
        lines.append('"$TRTEXEC" ' + " ".join(shlex.quote(c) for c in cmd) + f" | tee {OUT_DIR}/{run.name}.log")
    script = artifact / "trtexec.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return script


SMALL_DEVICE_HEAD_MB = 256  # a single LM-head weight above this fails TensorRT's tactics on 8 GB Jetsons


def lm_head_slices(onnx_path: Path) -> int:
    """How many vocabulary slices ``llm.onnx``'s LM head has (``apet-export --split-lm-head``): the inputs of the
    Concat that produces the logits, 1 for a single MatMul."""
    import onnx

    from apet.contracts.io import LOGITS

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = next((n for n in graph.node if LOGITS in n.output), None)
    return len(producer.input) if producer is not None and producer.op_type == "Concat" else 1


def small_device_notes(artifact: Path, manifest: Manifest, workspace_mb: int | None) -> list[str]:
    """Comment lines for 8 GB devices (Orin Nano): how to cap the LLM build's workspace, and whether the LM head
    is split into slices TensorRT can place there (apet-export --split-lm-head)."""
    spec = manifest.model.decoder
    head_mb = spec.vocab_size * spec.hidden_size * (2 if manifest.dtype == "fp16" else 4) / 2**20
    slices = lm_head_slices(artifact / manifest.graphs["llm"].file)
    lines = ["# 8 GB devices (Jetson Orin Nano): SMALL_DEVICE=1 ./trtexec.sh caps the LLM builder workspace at 1 GiB"]
    if slices > 1:
        lines.append(f"# the LM head is {slices} vocabulary slices of {head_mb / slices:.0f} MiB (apet-export "
                     f"--split-lm-head {slices}), which TensorRT places on 8 GB devices")
    elif head_mb > SMALL_DEVICE_HEAD_MB:
        lines.append(f"# the LM head is one {head_mb:.0f} MiB weight, which TensorRT's tactics cannot place on 8 GB "
                     f"devices: re-export with apet-export --split-lm-head {max(2, round(head_mb / 256))}")
    return lines


# -- parsing ---------------------------------------------------------------------------------------
def _load(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read trtexec output {path}: {exc}", "re-run trtexec.sh") from exc


def summarize_times(path: Path) -> dict[str, float]:
    """``--exportTimes`` JSON (a list of per-inference records) -> median/p90 latency and GPU compute (ms)."""
    records = _load(path)
    if not isinstance(records, list) or not records:
        raise ArtifactError(f"{path} holds no timing records", "re-run trtexec with --exportTimes")
    out: dict[str, float] = {"inferences": float(len(records))}
    for key in ("latencyMs", "computeMs"):
        values = sorted(float(r[key]) for r in records if isinstance(r, dict) and key in r)
        if values:
            out[f"{key[:-2]}_median_ms"] = statistics.median(values)
            out[f"{key[:-2]}_p90_ms"] = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    return out


def top_layers(path: Path, count: int = 10) -> list[dict[str, Any]]:
    """``--exportProfile`` JSON -> the ``count`` most expensive layers by average time."""
    records = _load(path)
    layers = [r for r in records if isinstance(r, dict) and "name" in r and "averageMs" in r]
    layers.sort(key=lambda r: float(r["averageMs"]), reverse=True)
    return [{"name": r["name"], "average_ms": float(r["averageMs"]), "median_ms": float(r.get("medianMs", 0.0)),
             "percentage": float(r.get("percentage", 0.0))} for r in layers[:count]]


def report(directory: Path) -> str:
    """A Markdown latency table for every ``*.times.json`` under ``directory/trtexec``."""
    root = Path(directory) / OUT_DIR if (Path(directory) / OUT_DIR).is_dir() else Path(directory)
    lines = ["| run | median ms | p90 ms | GPU compute median ms |", "|---|---:|---:|---:|"]
    details = []
    for times in sorted(root.glob("*.times.json")):
        name = times.name[: -len(".times.json")]
        s = summarize_times(times)
        lines.append(f"| {name} | {s.get('latency_median_ms', float('nan')):.3f} | "
                     f"{s.get('latency_p90_ms', float('nan')):.3f} | {s.get('compute_median_ms', float('nan')):.3f} |")
        profile = root / f"{name}.profile.json"
        if profile.is_file():
            details.append(f"\n**{name}: top layers**\n\n| layer | avg ms | % |\n|---|---:|---:|")
            details += [f"| `{r['name'][:80]}` | {r['average_ms']:.4f} | {r['percentage']:.1f} |"
                        for r in top_layers(profile)]
    if len(lines) == 2:
        raise ArtifactError(f"no *.times.json under {root}", "run trtexec.sh first (it needs trtexec on PATH)")
    return "\n".join(lines + details)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apet.engines.trtexec")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="latency table from trtexec --exportTimes/--exportProfile JSON")
    rep.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    print(report(args.directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
