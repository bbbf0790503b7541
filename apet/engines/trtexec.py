"""``trtexec`` command lines for the artifact's engines, and a parser for trtexec's JSON exports.

Users on Jetson or a desktop GPU already profile with ``trtexec``; this writes
the exact lines that build each engine with the manifest's profiles and time
it at realistic shapes (prefill at the export's visual-token count, decode at
several past lengths), with the integer inputs (positions, mask, image start)
written as binary files so they are meaningful rather than random.

``python -m apet.engines.trtexec report DIR`` turns ``--exportTimes`` /
``--exportProfile`` JSON into a latency table and the time per stage
(:mod:`apet.engines.profile_report`).
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from apet.atomic import atomic_directory, write_atomic
from apet.contracts.files import ENGINE_FILES
from apet.contracts.io import INJECTED_ROWS
from apet.contracts.specs import resolve_shape
from apet.contracts.targets import TARGETS
from apet.engines.profile_report import OUT_DIR, RUNS_FILE, report, summarize_times, top_layers
from apet.engines.profiles import OPT_TEXT_TOKENS, ShapeLimits, check_workspace, llm_profiles, vision_profiles
from apet.engines.trt import Profile
from apet.errors import guarded
from apet.manifest import Manifest, read_manifest
from apet.models.registry import family_of

__all__ = ["build_command", "profile_command", "profiling_runs", "write_trtexec_script", "report",
           "summarize_times", "top_layers", "main"]

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
    """A trtexec build line. Since TensorRT 10.0 ``--profile=N`` opens profile N and must come right before
    its ``--minShapes``/``--optShapes``/``--maxShapes`` group (trtexec reads the three flags that follow it);
    the same grammar holds in 10.3 (JetPack 6), 10.16+ (JetPack 7) and 11."""
    cmd = ["--onnx=" + onnx_file, "--saveEngine=" + engine_file, "--stronglyTyped", "--profilingVerbosity=detailed"]
    for index, profile in enumerate(profiles):
        cmd.append(f"--profile={index}")
        for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            cmd.append(f"{flag}=" + _shape_flag({n: s[i] for n, s in profile.shapes.items()}))
    if workspace_mb:
        cmd.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if layer_info:
        cmd.append("--exportLayerInfo=" + layer_info)
    return cmd


def profile_command(run: Run, out_dir: str = OUT_DIR, iterations: int = 200) -> list[str]:
    """A trtexec profiling line; ``--useProfile=N`` selects the engine's profile N at run time
    (``--profile`` is a build flag since TensorRT 10)."""
    cmd = ["--loadEngine=" + run.engine, f"--useProfile={run.profile}", "--shapes=" + _shape_flag(run.shapes),
           "--useCudaGraph", "--noDataTransfers", "--separateProfileRun", "--dumpProfile",
           f"--iterations={iterations}", "--warmUp=500", "--avgRuns=10",
           f"--exportTimes={out_dir}/{run.name}.times.json", f"--exportProfile={out_dir}/{run.name}.profile.json"]
    if run.int_inputs:
        cmd.append("--loadInputs=" + ",".join(f"{n}:{out_dir}/inputs/{run.name}.{n}.bin" for n in run.int_inputs))
    return cmd


def _llm_run(name: str, manifest: Manifest, artifact: Path, profile_index: int, seq: int, past: int) -> Run:
    """Batch 1, ``seq`` new tokens after ``past``: shapes from the cache layout, meaningful integer inputs (the
    image span starts where the artifact's own template puts it, counted with its tokenizer)."""
    # a prefill's first tokens are visual rows of the injected inputs (families that declare them), decode has none
    visual = min(seq, family_of(manifest).typical_visual_tokens(manifest)) if past == 0 else 0
    dims = manifest.cache_layout.dims(1, seq, past, visual)
    shapes = {spec["name"]: resolve_shape(spec, dims) for spec in manifest.graphs["llm"].inputs}
    positions = np.arange(past, past + seq, dtype=np.int64)
    ints = {"position_ids": np.broadcast_to(positions, shapes["position_ids"]).copy(),
            "attention_mask": np.ones((1, past + seq), dtype=np.int64)}
    if INJECTED_ROWS in shapes:
        rows = np.full((1, seq), -1, dtype=np.int64)
        rows[0, :visual] = np.arange(visual)
        ints[INJECTED_ROWS] = rows
    if "image_start" in shapes:
        ints["image_start"] = np.array([family_of(manifest).text_before_media(manifest, artifact)], dtype=np.int64)
    return Run(name, ENGINE_FILES["llm"], profile_index, shapes, ints)


def _vision_run(manifest: Manifest, limits: ShapeLimits) -> Run:
    """Batch 1 at the profile's smallest shapes, or at the family's typical request where the vision graph takes
    integer inputs (index bookkeeping must be real, not trtexec's random fill): symbolic dims from those."""
    vision = vision_profiles(manifest, limits)[0]
    ints = family_of(manifest).profiling_vision_inputs(manifest)
    if not ints:
        # the opt shapes: one image (LLaVA-NeXT: all views of one image at the largest grid)
        return Run("vision_b1", ENGINE_FILES["vision"], 0, {n: s[1] for n, s in vision.shapes.items()}, {})
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
    prompt = min(limits.max_prompt, family_of(manifest).typical_visual_tokens(manifest) + OPT_TEXT_TOKENS)
    runs.append(_llm_run(f"prefill_{prompt}", manifest, artifact, 0, prompt, 0))
    shortest = decode.shapes["attention_mask"][0][1] - 1
    for past in sorted({p for p in DECODE_PAST if p < limits.max_context} | {prompt}):
        if past >= shortest:
            runs.append(_llm_run(f"decode_past{past}", manifest, artifact, 1, 1, past))
    return runs


def _line(cmd: list[str], log: str, indent: str = "", shell_words: str = "") -> str:
    """One script line; ``--loadEngine`` keeps ``$ENGINES`` expandable, everything else is quoted;
    ``shell_words`` go in unquoted, for bash to expand."""
    words = [f'"{c}"' if c.startswith("--loadEngine=$ENGINES/") else shlex.quote(c) for c in cmd]
    return f'{indent}"$TRTEXEC" ' + " ".join(words) + shell_words + f" | tee {OUT_DIR}/{log}"


def write_trtexec_script(artifact: Path, limits: ShapeLimits, workspace_mb: int | None = None) -> Path:
    """Write ``trtexec.sh``, its integer input files and ``trtexec/runs.json`` into the artifact directory.

    The script is replaced in one rename and the input folder in one swap, so
    no file of an earlier emission survives beside the new lines. ``BUILD=1``
    builds into ``trtexec/`` and profiles those engines; the engines
    ``apet-build`` recorded in ``build_report.json`` are never overwritten.
    """
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    check_workspace(workspace_mb)
    (artifact / OUT_DIR).mkdir(exist_ok=True)
    runs = profiling_runs(manifest, limits, artifact)
    with atomic_directory(artifact / OUT_DIR / "inputs", overwrite=True) as inputs_dir:
        for run in runs:
            for tensor, values in run.int_inputs.items():
                write_atomic(inputs_dir / f"{run.name}.{tensor}.bin", values.tobytes())
    lines = ["#!/usr/bin/env bash",
             "# Generated by apet-build --emit-trtexec: builds and profiles this artifact's engines with trtexec.",
             f"# BUILD=1 (default) builds with trtexec into {OUT_DIR}/ and profiles those engines; BUILD=0 profiles",
             "# the engines apet-build wrote (vision.plan, llm.plan), which this script never overwrites.",
             "# TRTEXEC=path overrides the trtexec binary. Then: python -m apet.engines.trtexec report .",
             f"# Exported with --target {manifest.target} ({manifest.attention} attention, opset {manifest.opset}): "
             f"for {TARGETS[manifest.target].builders}." if manifest.target in TARGETS else "#",
             "# SMALL_DEVICE=1 caps the LLM builder workspace for 8 GB devices (notes below the builds).",
             "set -euo pipefail", 'cd "$(dirname "$0")"', 'TRTEXEC="${TRTEXEC:-trtexec}"', f"mkdir -p {OUT_DIR}",
             'if [ "${BUILD:-1}" = "1" ]; then', f"  ENGINES={OUT_DIR}"]
    for name, file in ENGINE_FILES.items():
        profiles = vision_profiles(manifest, limits) if name == "vision" else \
            llm_profiles(manifest, limits.max_batch, limits.max_context, limits.max_prompt)
        cmd = build_command(manifest.graphs[name].file, f"{OUT_DIR}/{file}", profiles, workspace_mb=workspace_mb,
                            layer_info=f"{OUT_DIR}/{name}.layers.json")
        small = " ${SMALL_DEVICE:+--memPoolSize=workspace:1024M}" if name == "llm" and not workspace_mb else ""
        lines.append(_line(cmd, f"build_{name}.log", "  ", small))
    lines += ["else", "  ENGINES=.", "fi"]
    lines += small_device_notes(artifact, manifest, workspace_mb)
    for run in runs:
        cmd = profile_command(Run(run.name, f"$ENGINES/{run.engine}", run.profile, run.shapes, run.int_inputs))
        lines.append(_line(cmd, f"{run.name}.log"))
    graph_of = {file: name for name, file in ENGINE_FILES.items()}
    write_atomic(artifact / OUT_DIR / RUNS_FILE, json.dumps(
        [{"name": r.name, "graph": graph_of[r.engine], "profile": r.profile,
          "shapes": {k: list(v) for k, v in r.shapes.items()}} for r in runs], indent=1))
    return write_atomic(artifact / "trtexec.sh", "\n".join(lines) + "\n", mode=0o755)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apet.engines.trtexec",
                                     description="Latency tables from the JSON that trtexec.sh writes.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="latency table and time per stage (vision, ApET, layers) from trtexec "
                         "--exportTimes/--exportProfile JSON")
    rep.add_argument("directory", type=Path, help="the artifact directory (or its trtexec/ folder)")
    rep.add_argument("--verbose", "-v", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)
    return guarded(lambda: print(report(args.directory)) or 0, args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
