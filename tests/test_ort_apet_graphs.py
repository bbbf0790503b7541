"""scripts/ort_apet_graphs.py: each ApET scope cut out of the exported graphs as a graph of its own, fed the tensors
the whole graph hands it, computes what the whole graph computes there (so its GPU timing on the H200 is ApET's
cost inside ONNX Runtime's graphs), and the cut holds exactly the scope's nodes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import onnx
import pytest

from apet import scopes
from apet.check.graph import scope_of_tensor

SCRIPT = Path(__file__).parents[1] / "scripts" / "ort_apet_graphs.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("ort_apet_graphs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ort_apet_graphs"] = module
    spec.loader.exec_module(module)
    return module


def _scope_nodes(path: Path, scope: str) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(scope_of_tensor(n.name) == scope for n in model.graph.node)


def test_each_cut_computes_what_the_whole_graph_computes(artifact_factory, script) -> None:
    artifact = artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")
    result = script.measure(artifact, "cpu", calls=2, bound_runs=True)  # the CUDA branch's bound runs, uncaptured
    for scope, graph in ((scopes.APET_STAGE1, "vision.onnx"), (scopes.APET_STAGE2, "llm_prefill.onnx")):
        row = result[scope]
        assert row["outputs_equal"] and row["max_abs_diff"] == 0.0, scope
        assert row["graphed_outputs_equal"] and "graphed_refused" not in row, scope
        assert row["nodes"] == _scope_nodes(artifact / graph, scope) > 100, scope
        assert row["ungraphed"]["calls"] == row["graphed"]["calls"] == 2
    assert result["vision_whole"]["nodes"] > result[scopes.APET_STAGE1]["nodes"]
    # stage 2 reads the prompt's length, shape arithmetic of the whole graph: bound on the host and twinned on the
    # device as the backend's prefill does (fed on the device, ONNX Runtime copied it inside the run and refused
    # the cut's CUDA graph on the H100, docs/benchmarks.md stop 58); stage 1 reads none
    assert result[scopes.APET_STAGE1]["host_inputs"] == [] and result[scopes.APET_STAGE1]["device_twins"] == 0
    stage2 = result[scopes.APET_STAGE2]
    assert len(stage2["host_inputs"]) == 1 and stage2["device_twins"] > 0
    assert stage2["nodes_run"] > stage2["nodes"]


def test_host_values_are_the_cuts_shape_arithmetic(artifact_factory, script) -> None:
    """host_values: small integer tensors the whole graph computes, never its own inputs (a request's values)."""
    import numpy as np

    artifact = artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")
    model = onnx.load(str(artifact / "vision.onnx"), load_external_data=False)
    own = model.graph.input[0].name
    inner = model.graph.node[0].output[0]
    values = {own: np.array([3]), inner: np.array([3]), "wide": np.arange(9), "real": np.array([1.0])}
    assert script.host_values(model, [own, inner, "wide", "real"], values) == frozenset({inner})


def test_a_cut_holds_only_its_scopes_nodes(artifact_factory, script) -> None:
    """cut() stops at the tensors the scope reads from outside it; given fewer, the extractor walks back into the
    tower (what the node-count check above would catch)."""
    from apet.check.graph import scope_io

    artifact = artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")
    model = onnx.load(str(artifact / "vision.onnx"))
    part, inputs, outputs = script.cut(model, scopes.APET_STAGE1)
    assert {scope_of_tensor(n.name) for n in part.graph.node} == {scopes.APET_STAGE1}
    assert [i.name for i in part.graph.input] == inputs and [o.name for o in part.graph.output] == outputs
    assert (inputs, outputs) == scope_io(model, scopes.APET_STAGE1)
    short = onnx.utils.Extractor(model).extract_model(inputs[1:], outputs)
    assert {scope_of_tensor(n.name) for n in short.graph.node} > {scopes.APET_STAGE1}
