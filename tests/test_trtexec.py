"""trtexec.sh: every line checked by trtexec 10.3's own argument parser, the script's file safety, and
``python -m apet.engines.trtexec report`` grouping per-layer time by the exported graphs' scopes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from apet.engines.profiles import ShapeLimits, llm_profiles, vision_profiles
from apet.engines.trtexec import (
    build_command,
    profiling_runs,
    report,
    summarize_times,
    top_layers,
    write_trtexec_script,
)
from apet.errors import ArtifactError, UsageError
from apet.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
# the parse-only build of trtexec 10.3's sampleOptions.cpp, in the shared folder next to the repository
# (APET_TRTEXEC_PARSE points at it from a checkout elsewhere)
PARSER = Path(os.environ.get("APET_TRTEXEC_PARSE")
              or REPO.parent / "shared" / "tools" / "trtexec-10.3-parse" / "parse_main")


@pytest.fixture(scope="session")
def trtexec_parser() -> Path:
    if not (PARSER.is_file() and os.access(PARSER, os.X_OK)):
        pytest.skip(f"the trtexec 10.3 parser is not at {PARSER} (../shared/tools is absent next to this checkout; "
                    "set APET_TRTEXEC_PARSE to its parse_main)")
    return PARSER


def _emit(artifact_factory, tmp_path: Path, stages: int, **limits: int) -> Path:
    artifact = tmp_path / f"artifact{stages}"
    if not artifact.exists():
        shutil.copytree(artifact_factory(ratio=0.11, stages=stages, dtype="fp16"), artifact)
    write_trtexec_script(artifact, ShapeLimits.from_manifest(read_manifest(artifact), **limits))
    return artifact


def _invocations(script: Path, engines: str) -> list[list[str]]:
    """Every trtexec call of the script as bash passes its arguments ($ENGINES expanded)."""
    calls = []
    for line in script.read_text().splitlines():
        line = line.strip()
        if line.startswith('"$TRTEXEC"'):
            command = line.split(" | tee ")[0].replace("$ENGINES", engines)
            command = re.sub(r"\$\{SMALL_DEVICE:\+([^}]*)\}", r"\1", command)  # as bash with SMALL_DEVICE=1
            calls.append(shlex.split(command)[1:])
    return calls


@pytest.mark.parametrize("stages", [1, 2])
def test_every_trtexec_line_parses_with_trtexec_10_3(artifact_factory, trtexec_parser: Path, tmp_path: Path,
                                                      stages: int) -> None:
    artifact = _emit(artifact_factory, tmp_path, stages)
    script = artifact / "trtexec.sh"
    runs = profiling_runs(read_manifest(artifact), ShapeLimits.from_manifest(read_manifest(artifact)), artifact)
    calls = _invocations(script, "trtexec")
    assert len(calls) == 2 + len(runs)
    outputs = []
    for words in calls:
        result = subprocess.run([str(trtexec_parser), *words], capture_output=True, text=True)
        assert result.returncode == 0 and "PARSED OK" in result.stdout, f"{result.stdout}\n{shlex.join(words)}"
        outputs.append(result.stdout)
    assert "build profiles=1 " in outputs[0] and "build profiles=2 " in outputs[1]  # vision; llm prefill+decode
    for run, output in zip(runs, outputs[2:]):
        assert f"inference profile index={run.profile} " in output
    # the script as bash runs it, the parser standing in for trtexec: both the build and the reuse paths
    for build, expected in (("1", len(calls)), ("0", len(runs))):
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                                env={**os.environ, "TRTEXEC": str(trtexec_parser), "BUILD": build})
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("PARSED OK") == expected and "ERROR" not in result.stdout


@pytest.mark.parametrize("family", ["llava-next", "video-llava", "qwen2_5_vl", "qwen3_vl", "internvl"])
def test_every_family_trtexec_line_parses_with_trtexec_10_3(family_artifacts, trtexec_parser: Path, tmp_path: Path,
                                                             family: str) -> None:
    """The other families' scripts, Qwen3-VL's injected inputs (injected_embeds, injected_rows) included."""
    artifact = tmp_path / family
    shutil.copytree(family_artifacts[family], artifact)
    write_trtexec_script(artifact, ShapeLimits.from_manifest(read_manifest(artifact)))
    calls = _invocations(artifact / "trtexec.sh", "trtexec")
    assert len(calls) >= 3
    for words in calls:
        result = subprocess.run([str(trtexec_parser), *words], capture_output=True, text=True)
        assert result.returncode == 0 and "PARSED OK" in result.stdout, f"{result.stdout}\n{shlex.join(words)}"
    if family == "qwen3_vl":
        build_llm = next(shlex.join(w) for w in calls if any("llm.plan" in x for x in w))
        assert "injected_embeds:" in build_llm and "injected_rows:" in build_llm


def test_trtexec_lines_follow_the_manifest(artifact_factory, tmp_path: Path) -> None:
    artifact = _emit(artifact_factory, tmp_path, 2, max_context=512)
    manifest = read_manifest(artifact)
    limits = ShapeLimits.from_manifest(manifest, max_context=512)
    script = (artifact / "trtexec.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "--stronglyTyped" in script
    build_llm = next(line for line in script.splitlines() if "--saveEngine=trtexec/llm.plan" in line)
    words = shlex.split(build_llm.split(" | ")[0])
    groups = [i for i, w in enumerate(words) if w.startswith("--profile=")]
    assert [words[i] for i in groups] == ["--profile=0", "--profile=1"]  # prefill + decode
    for i in groups:  # trtexec takes the three flags right after --profile=N as that profile's shapes
        assert [w.split("=")[0] for w in words[i + 1:i + 4]] == ["--minShapes", "--optShapes", "--maxShapes"]
    assert "inputs_embeds:1x41x64" in build_llm and "inputs_embeds:4x512x64" in build_llm
    runs = {run.name: run for run in profiling_runs(manifest, limits, artifact)}
    prefill = runs["prefill_80"]
    assert prefill.profile == 0 and prefill.shapes["inputs_embeds"] == (1, 80, 64)
    assert prefill.shapes["past_key.2"] == (1, 2, 0, 16)
    assert prefill.int_inputs["position_ids"].tolist() == [list(range(80))]
    decode = runs["decode_past128"]
    assert decode.profile == 1 and decode.shapes["attention_mask"] == (1, 129)
    assert decode.shapes["past_key.0"] == (1, 2, 128, 16) and decode.shapes["past_key.3"] == (1, 2, 104, 16)
    # the real count of the artifact's template before <image>: BOS + the vicuna_v1 system sentence + "USER:"
    from apet.models.prompt import PromptEncoder

    before = len(PromptEncoder(artifact, manifest.model).split("x")[0])
    assert before > 20 and decode.int_inputs["image_start"].tolist() == [before]
    for flag in ("--useCudaGraph", "--noDataTransfers", "--separateProfileRun", "--dumpProfile",
                 "--exportTimes=trtexec/decode_past128.times.json", "--exportProfile=", "--shapes=",
                 "--useProfile=1", "--loadInputs=position_ids:trtexec/inputs/decode_past128.position_ids.bin"):
        assert flag in script
    assert " --profile=" not in script.split("\nfi\n", 1)[1]  # run lines select with --useProfile
    saved = np.fromfile(artifact / "trtexec/inputs/decode_past128.attention_mask.bin", dtype=np.int64)
    assert saved.tolist() == [1] * 129
    vision = vision_profiles(manifest, limits)
    assert build_command("v.onnx", "v.plan", vision)[4:6] == ["--profile=0", "--minShapes=pixel_values:1x3x224x224"]
    assert len(llm_profiles(manifest, max_context=512)) == 2
    listed = json.loads((artifact / "trtexec/runs.json").read_text())
    assert [r["name"] for r in listed] == list(runs) and listed[0]["graph"] == "vision"


FAKE_TRTEXEC = """#!/usr/bin/env bash
# stands in for trtexec: writes what --saveEngine names, reports what --loadEngine names
for a in "$@"; do
  case "$a" in
    --saveEngine=*) echo "trtexec engine" > "${a#--saveEngine=}" ;;
    --loadEngine=*) echo "LOAD ${a#--loadEngine=}" ;;
  esac
done
"""


def test_build_1_never_replaces_the_engines_apet_build_recorded(artifact_factory, tmp_path: Path) -> None:
    artifact = _emit(artifact_factory, tmp_path, 1)
    for plan in ("vision.plan", "llm.plan"):
        (artifact / plan).write_text("apet-build engine")
    fake = tmp_path / "fake_trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    built = subprocess.run(["bash", str(artifact / "trtexec.sh")], capture_output=True, text=True,
                           env={**os.environ, "TRTEXEC": str(fake), "BUILD": "1"})
    assert built.returncode == 0, built.stderr
    assert (artifact / "vision.plan").read_text() == (artifact / "llm.plan").read_text() == "apet-build engine"
    assert (artifact / "trtexec/vision.plan").read_text() == "trtexec engine\n"
    loads = {line.split()[1] for line in built.stdout.splitlines() if line.startswith("LOAD")}
    assert loads == {"trtexec/vision.plan", "trtexec/llm.plan"}  # BUILD=1 profiles what it built
    reused = subprocess.run(["bash", str(artifact / "trtexec.sh")], capture_output=True, text=True,
                            env={**os.environ, "TRTEXEC": str(fake), "BUILD": "0"})
    assert {line.split()[1] for line in reused.stdout.splitlines() if line.startswith("LOAD")} == \
        {"./vision.plan", "./llm.plan"}


def test_emission_replaces_earlier_inputs(artifact_factory, tmp_path: Path) -> None:
    artifact = _emit(artifact_factory, tmp_path, 2)  # max_context 1024: decode runs up to past 512
    assert (artifact / "trtexec/inputs/decode_past512.position_ids.bin").is_file()
    (artifact / "trtexec/decode_past512.times.json").write_text("[]")  # a user's earlier result is kept
    _emit(artifact_factory, tmp_path, 2, max_context=256)
    manifest = read_manifest(artifact)
    runs = profiling_runs(manifest, ShapeLimits.from_manifest(manifest, max_context=256), artifact)
    expected = {f"{r.name}.{t}.bin" for r in runs for t in r.int_inputs}
    assert {p.name for p in (artifact / "trtexec/inputs").iterdir()} == expected
    assert "decode_past512" not in (artifact / "trtexec.sh").read_text()
    assert (artifact / "trtexec/decode_past512.times.json").is_file()
    assert not list((artifact / "trtexec").glob(".inputs*")) and not list(artifact.glob(".trtexec.sh*"))


@pytest.mark.parametrize(("limits", "words"), [
    ({"max_context": 99999}, "--max-context 99999"), ({"max_batch": 64}, "--max-batch 64"),
    ({"max_batch": 0}, "--max-batch 0"), ({"max_context": 8}, "--max-context 8")])
def test_limits_beyond_the_export_are_refused(artifact_factory, limits: dict, words: str) -> None:
    manifest = read_manifest(artifact_factory(ratio=0.11, stages=2, dtype="fp16"))
    with pytest.raises(UsageError, match=words):
        ShapeLimits.from_manifest(manifest, **limits)


def test_emit_refuses_out_of_range_options(artifact_factory, tmp_path: Path) -> None:
    artifact = tmp_path / "a"
    shutil.copytree(artifact_factory(ratio=0.11, stages=2, dtype="fp16"), artifact)
    for extra, words in ((["--max-context", "99999"], "--max-context 99999"), (["--max-batch", "64"], "--max-batch"),
                         (["--workspace", "-1"], "--workspace -1")):
        run = subprocess.run([sys.executable, "-m", "apet.cli", "build", str(artifact), "--emit-trtexec", *extra],
                             capture_output=True, text=True)
        assert run.returncode == 2 and words in run.stderr and "Traceback" not in run.stderr
    assert not (artifact / "trtexec.sh").exists()


# -- reading trtexec's JSON ------------------------------------------------------------------------
def _write_trtexec_outputs(directory: Path) -> None:
    """Samples in trtexec's documented --exportTimes / --exportProfile formats."""
    directory.mkdir(parents=True)
    times = [{"startEnqMs": i * 2.0, "endEnqMs": i * 2.0 + 0.05, "startComputeMs": i * 2.0 + 0.01,
              "endComputeMs": i * 2.0 + 1.0 + i * 0.01, "startOutMs": 0, "endOutMs": 0, "inMs": 0,
              "computeMs": 0.99 + i * 0.01, "outMs": 0, "latencyMs": 1.0 + i * 0.01, "endToEndMs": 1.0 + i * 0.01}
             for i in range(11)]
    (directory / "decode_past128.times.json").write_text(json.dumps(times))
    profile = [{"count": 11}] + [{"name": f"layer_{i}", "timeMs": 11 * 0.01 * i, "averageMs": 0.01 * i,
                                  "medianMs": 0.01 * i, "percentage": float(i)} for i in range(15)]
    (directory / "decode_past128.profile.json").write_text(json.dumps(profile))


def test_trtexec_json_parsing(tmp_path: Path) -> None:
    _write_trtexec_outputs(tmp_path / "trtexec")
    summary = summarize_times(tmp_path / "trtexec/decode_past128.times.json")
    assert summary["inferences"] == 11
    assert summary["latency_median_ms"] == pytest.approx(1.05) and summary["latency_p90_ms"] == pytest.approx(1.09)
    assert summary["compute_median_ms"] == pytest.approx(1.04)
    layers = top_layers(tmp_path / "trtexec/decode_past128.profile.json")
    assert [layer["name"] for layer in layers] == [f"layer_{i}" for i in range(14, 4, -1)]
    table = report(tmp_path)
    assert "| decode_past128 | 1.050 | 1.090 | 1.040 |" in table and "`layer_14`" in table
    with pytest.raises(ArtifactError, match="no trtexec results"):
        report(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir(exist_ok=True)
    return tmp_path / "empty"


def _node_names(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type not in ("Constant", "Identity")]


def test_report_groups_time_by_the_exported_scopes(artifact_factory, tmp_path: Path) -> None:
    """A profile in trtexec's format whose layer names are the real exported node names (single nodes, TensorRT
    fusions "a + b", a Myelin region across two layers, a reformat and an internal kernel)."""
    artifact = artifact_factory(ratio=0.11, stages=2, dtype="fp16")
    vision, llm = _node_names(artifact / "vision.onnx"), _node_names(artifact / "llm.onnx")
    assert {n.split("/")[1] for n in vision} == {"vision", "apet_stage1", "projector"}
    assert {"layers.0", "layers.3", "apet_stage2"} <= {n.split("/")[1] for n in llm}
    assert not [n for n in vision + llm if "/TopK" in n and "/apet_stage" not in n]  # ApET ops carry its scope

    def top(name: str) -> str:
        return name.split("/")[1]

    vision_layers = [{"name": n, "averageMs": 0.002} for n in vision]
    vision_layers[0] = {"name": vision[0] + " + " + vision[1], "averageMs": 0.002}  # a fusion inside vision
    vision_layers.append({"name": "Reformatting CopyNode for Input Tensor 0 to " + vision[0], "averageMs": 0.004})
    vision_layers.append({"name": "__myl_MulSum_myl0_7", "averageMs": 0.008})
    l0 = [n for n in llm if top(n) == "layers.0"]
    l1 = [n for n in llm if top(n) == "layers.1"]
    llm_layers = [{"name": n, "averageMs": 0.001} for n in llm if top(n) not in ("layers.0", "layers.1")]
    llm_layers.append({"name": "{ForeignNode[" + l0[0] + "..." + l1[-1] + "]}", "averageMs": 0.5})
    out = tmp_path / "trtexec"
    out.mkdir()
    for run, layers in (("vision_b1", vision_layers), ("prefill_80", llm_layers)):
        total = sum(layer["averageMs"] for layer in layers)
        (out / f"{run}.profile.json").write_text(json.dumps(
            [{"count": 10}] + [{**layer, "timeMs": 10 * layer["averageMs"], "medianMs": layer["averageMs"],
                                "percentage": 100 * layer["averageMs"] / total} for layer in layers]))
        (out / f"{run}.times.json").write_text(json.dumps([{"latencyMs": total, "computeMs": total}] * 3))
    table = report(tmp_path)

    apet1 = 0.002 * sum(top(n) == "apet_stage1" for n in vision)
    vision_total = sum(layer["averageMs"] for layer in vision_layers)
    assert f"| apet_stage1 | {apet1:.4f} | {100 * apet1 / vision_total:.1f} |" in table
    assert f"ApET {apet1:.4f} ms = {100 * apet1 / vision_total:.1f}%" in table
    vision_tower = 0.002 * sum(top(n) == "vision" for n in vision) + 0.004  # the reformat feeds a vision node
    assert f"| vision | {vision_tower:.4f} |" in table and "| (unattributed) | 0.0080 |" in table
    apet2 = 0.001 * sum(top(n) == "apet_stage2" for n in llm)
    assert f"| apet_stage2 | {apet2:.4f} |" in table
    assert "| layers.0+layers.1 | 0.5000 |" in table  # a region fused across layers is shown as such
    later = 0.001 * sum(top(n) in ("layers.2", "layers.3") for n in llm)
    assert f"| llm layers | {later + 0.5:.4f} |" in table and "| layers.3 |" in table
    row = next(line for line in table.splitlines() if line.startswith("| vision_b1 |"))
    assert row.endswith(f"| {100 * apet1 / vision_total:.1f} |")


def test_report_command_errors_are_clean(tmp_path: Path) -> None:
    for target in (_empty(tmp_path), tmp_path / "missing"):
        run = subprocess.run([sys.executable, "-m", "apet.engines.trtexec", "report", str(target)],
                             capture_output=True, text=True)
        assert run.returncode == 4 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
        assert "trtexec.sh" in run.stderr or "directory" in run.stderr
