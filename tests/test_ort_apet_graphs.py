"""scripts/ort_apet_graphs.py: each ApET scope cut out of the exported graphs as a graph of its own, fed the tensors
the whole graph hands it, computes what the whole graph computes there (so its GPU timing on the H200 is ApET's
cost inside ONNX Runtime's graphs), and the cut holds exactly the scope's nodes, plus the shape arithmetic of
the values the whole graph computes from shapes."""

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
    # stage 2 reads the prompt's length, which the whole graph computes from a shape: the cut computes it the same
    # way (ONNX Runtime places that on the CPU, as in the whole graph) and twins it on the device where kernels read
    # it as data; fed as an input, ONNX Runtime kept its arithmetic on the device and refused the cut's CUDA graph
    # on the H100 and the H200 (docs/benchmarks.md stop 59). Stage 1 reads no such value.
    assert result[scopes.APET_STAGE1]["shape_nodes"] == 0 and result[scopes.APET_STAGE1]["device_twins"] == 0
    stage2 = result[scopes.APET_STAGE2]
    assert stage2["shape_nodes"] > 0 and stage2["device_twins"] > 0
    assert stage2["nodes_run"] > stage2["nodes"] + stage2["shape_nodes"]


def test_shape_sources_follow_shapes_alone(script) -> None:
    """shape_sources: the tensors a value is computed from by their shapes only; a value that reads any tensor's
    values on the way (a graph input's, a computed one's) has none."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])
    count = helper.make_tensor_value_info("count", TensorProto.INT64, [])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "one"], ["n"]),
             helper.make_node("Sub", ["n", "one"], ["last"]),  # shape arithmetic: from x's shape alone
             helper.make_node("Add", ["last", "count"], ["mixed"]),  # reads a graph input's value
             helper.make_node("ReduceSum", ["x"], ["total"]), helper.make_node("Cast", ["total"], ["cast"],
                                                                                  to=TensorProto.INT64),
             helper.make_node("Add", ["cast", "n"], ["valued"])]  # reads x's values
    outputs = [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("last", "mixed", "valued")]
    graph = helper.make_graph(nodes, "g", [x, count], outputs, [numpy_helper.from_array(np.array(1, np.int64), "one")])
    model = helper.make_model(graph)
    assert script.shape_sources(model, "last") == frozenset({"x"})
    assert script.shape_sources(model, "mixed") == frozenset()
    assert script.shape_sources(model, "valued") == frozenset()
    assert script.shape_sources(model, "x") == frozenset()  # a graph input itself


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
    # stage 2: beside its own nodes the cut holds only the shape arithmetic of the prompt's length, which ONNX
    # Runtime's placement (as ort_device_shapes models it) puts on the CPU; no input is a value computed from shapes
    from apet.runtime.backends.ort_device_shapes import placed_on_cpu

    prefill = onnx.load(str(artifact / "llm_prefill.onnx"), load_external_data=False)
    part, inputs, _ = script.cut(prefill, scopes.APET_STAGE2)
    on_cpu = placed_on_cpu(part)
    outside = [(i, n) for i, n in enumerate(part.graph.node) if scope_of_tensor(n.name) != scopes.APET_STAGE2]
    assert outside and all(n.op_type in ("Shape", "Size") or i in on_cpu for i, n in outside)
    assert not any(script.shape_sources(prefill, name) for name in inputs)
    assert scope_io(prefill, scopes.APET_STAGE2)[0] != inputs  # the prompt's length was one of the scope's inputs
