"""apet check (issue 29): two ONNX Runtime runners (Polygraphy) on the fp32 and fp16 exports of the tiny LLaVA,
margins against the NumPy float64 oracle, a perturbed decoder layer located by --per-layer, the JSON schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import numpy_reference as ref
import onnx
import pytest
from numpy.testing import assert_allclose

from apet.check import CheckConfig, RunnerSpec, check
from apet.manifest import read_manifest

pytest.importorskip("polygraphy")
DEMO = str(Path(__file__).parents[1] / "apet" / "assets" / "demo.png")
STAGES = ["vision", "apet_stage1", "projector", "keep_index", "layers.0", "layers.1", "apet_stage2", "layers.2",
          "layers.3", "norm", "stage2_index", "logits", "greedy_tokens", "step_logits"]


@pytest.fixture(scope="module")
def exports(artifact_factory):
    return artifact_factory(ratio=0.11, stages=2), artifact_factory(ratio=0.11, stages=2, dtype="fp16")


@pytest.fixture(scope="module")
def fp32_vs_fp16(exports):
    fp32, fp16 = exports
    return check(CheckConfig([RunnerSpec("onnxruntime", fp32, label="fp32"), RunnerSpec("onnxruntime", fp16,
                                                                                        label="fp16")],
                             image=DEMO, prompt="What is shown?", steps=4), keep_outputs=True)


def test_report_names_the_stages_in_graph_order(fp32_vs_fp16):
    report, _ = fp32_vs_fp16
    assert report.runners == ["fp32", "fp16"]
    assert report.stage_names() == STAGES
    assert report.tolerance == {"atol": 2e-2, "rtol": 2e-2}  # a fp16 runner: the fp16 defaults
    rows = {row.stage: row for row in report.comparisons[0].stages}
    assert rows["keep_index"].metrics == {"equal": True, "shared": 1.0}  # ApET runs in float32 in both graphs
    assert rows["greedy_tokens"].metrics["steps"] == 4
    assert set(rows["projector"].metrics["visual_token_diff"]) == {"median", "max", "outliers", "tokens", "scale"}


def _oracle_margins(x: np.ndarray, keep: int, basis: int) -> tuple[float, float]:
    """Selection margin and the smallest merge margin from tests/numpy_reference.py's float64 steps."""
    x = x.astype(np.float64)
    err = ref.errors(x, ref.fps(x, basis))
    order = np.argsort(-err, kind="stable")
    targets, top = list(order[: keep - basis]), set(order[:keep].tolist())
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    gaps = []
    for j in range(len(x)):
        if j not in top:
            sims = sorted((float(unit[t] @ unit[j]) for t in targets), reverse=True)
            gaps.append(sims[0] - sims[1])
    return float(err[order[keep - 1]] - err[order[keep]]), min(gaps)


def test_selection_and_merge_margins_equal_the_float64_oracle(fp32_vs_fp16, exports):
    report, outputs = fp32_vs_fp16
    stage1 = read_manifest(exports[0]).compression.stage1
    margins = report.comparisons[0].margins
    for label, side in (("fp32", "reference"), ("fp16", "candidate")):
        features = outputs[label]["vision"][0]
        # the features are stage 1's input: the oracle's selection on them is the graph's kept index
        _, index = ref.compress_one(features, stage1.keep, stage1.basis)
        assert index.tolist() == outputs[label]["keep_index"][0].tolist()
        selection, merge = _oracle_margins(features, stage1.keep, stage1.basis)
        assert_allclose(margins[side][0]["selection_margin"], selection, rtol=1e-9, atol=1e-12)
        assert_allclose(margins[side][0]["min_merge_margin"], merge, rtol=1e-9, atol=1e-12)
        assert margins[side][0]["dropped_tokens"] == 256 - stage1.keep
    assert margins["reference"][0]["selection_margin"] > 0


def _perturbed_copy(artifact: Path, out: Path, layer: int) -> str:
    """A copy of ``artifact`` with one weight of decoder layer ``layer``'s MLP multiplied by 1.5."""
    shutil.copytree(artifact, out)
    model = onnx.load(str(out / "llm.onnx"))
    node = next(n for n in model.graph.node if n.name == f"/layers.{layer}/mlp/down_proj/MatMul")
    weight = next(i for i in model.graph.initializer if i.name in node.input)
    array = onnx.numpy_helper.to_array(weight) * np.float32(1.5)
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(out / "llm.onnx"))
    return node.name


def test_per_layer_locates_a_perturbed_decoder_layer(exports, tmp_path):
    fp32 = exports[0]
    node = _perturbed_copy(fp32, tmp_path / "perturbed", layer=1)
    report = check(CheckConfig([RunnerSpec("onnxruntime", fp32), RunnerSpec("onnxruntime", tmp_path / "perturbed")],
                               image=DEMO, prompt="What is shown?", steps=2, per_layer=True,
                               reduce_dir=tmp_path / "reduced", verify_checksums=False))
    comparison = report.comparisons[0]
    assert comparison.first_departure == "layers.1"
    assert comparison.first_departure_tensor == f"node:llm:{node}_output_0"  # the multiplied MatMul itself
    rows = {row.stage: row.passed for row in comparison.stages}
    assert all(rows[s] for s in ("vision", "apet_stage1", "projector", "keep_index", "layers.0"))
    assert not rows["layers.1"]
    reduced = onnx.load(comparison.reduced_onnx)
    assert reduced.graph.node and all(n.name.startswith("/layers.1/") for n in reduced.graph.node)


def test_identical_exports_have_no_departure(exports):
    fp32 = exports[0]
    report = check(CheckConfig([RunnerSpec("onnxruntime", fp32), RunnerSpec("onnxruntime", fp32)], image=DEMO,
                               steps=2))
    assert report.comparisons[0].first_departure is None
    assert report.tolerance == {"atol": 1e-4, "rtol": 1e-3}


def test_json_report_schema(exports, capsys):
    from apet.cli import main

    fp32, fp16 = exports
    assert main(["check", str(fp32), "--image", DEMO, "--backends", "onnxruntime", "--against", str(fp16),
                 "--steps", "2", "--atol", "0.5", "--rtol", "0.1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {"schema_version", "runners", "tolerance", "per_layer", "comparisons"}
    assert record["schema_version"] == 1 and record["tolerance"] == {"atol": 0.5, "rtol": 0.1}
    (comparison,) = record["comparisons"]
    assert set(comparison) == {"reference", "candidate", "stages", "first_departure", "first_departure_tensor",
                               "reduced_onnx", "margins"}
    assert [row["stage"] for row in comparison["stages"]] == STAGES[:-1] + ["step_logits"]
    assert all(set(row) == {"stage", "passed", "metrics"} for row in comparison["stages"])
    assert set(comparison["margins"]) == {"reference", "candidate", "merge_target_changes"}


def test_torch_runner_agrees_with_onnxruntime_on_fp32(exports):
    report = check(CheckConfig([RunnerSpec("onnxruntime", exports[0]), RunnerSpec("torch", exports[0])], image=DEMO,
                               steps=3))
    comparison = report.comparisons[0]
    assert [row.stage for row in comparison.stages] == ["projector", "keep_index", "logits", "greedy_tokens",
                                                        "step_logits"]
    assert comparison.first_departure is None, report.to_text()


def test_check_imports_no_torch_until_the_torch_runner():
    import subprocess
    import sys

    code = "import sys, apet.check, apet.check.runners; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
