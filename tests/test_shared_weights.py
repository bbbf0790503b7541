"""apet.export.shared_weights: a second graph's external tensors that equal the first's (type, shape, bytes) are
read from the first's file whatever their names and order; the rest move to a small file of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from apet.export.shared_weights import share_weights


def _model(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A graph that adds up its initializers (all [4, 4]), saved with every tensor as external data."""
    names = list(tensors)
    nodes = [helper.make_node("Add", [names[0], names[1]], ["s1"])]
    for i, name in enumerate(names[2:], start=1):
        nodes.append(helper.make_node("Add", [f"s{i}", name], [f"s{i + 1}"]))
    out = helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, [4, 4])
    graph = helper.make_graph(nodes, path.stem, [], [out], [numpy_helper.from_array(v, k) for k, v in tensors.items()])
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)


def test_tensors_are_matched_by_content_not_by_name_or_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a, b, c, only = (rng.standard_normal((4, 4)).astype(np.float32) for _ in range(4))
    _model(tmp_path / "first.onnx", {"w_a": a, "w_b": b, "w_c": c})
    second = {"x_c": c, "x_only": only, "x_a": a, "x_b": b}  # renamed, reordered, one of its own
    _model(tmp_path / "second.onnx", second)

    report = share_weights(tmp_path / "first.onnx", tmp_path / "second.onnx")

    assert (report.shared, report.shared_bytes, report.own_bytes) == (3, 3 * 64, 64)
    model = onnx.load(str(tmp_path / "second.onnx"), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data}["location"] for t in model.graph.initializer}
    assert where == {"x_c": "first.onnx.data", "x_only": "second.onnx.data", "x_a": "first.onnx.data",
                     "x_b": "first.onnx.data"}
    assert (tmp_path / "second.onnx.data").stat().st_size == 64  # the old file replaced by the one own tensor
    loaded = onnx.load(str(tmp_path / "second.onnx"))
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), second[tensor.name], err_msg=tensor.name)
    assert not list(tmp_path.glob("*.partial"))


def test_a_graph_with_every_tensor_shared_keeps_no_file_of_its_own(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((4, 4)).astype(np.float32) for _ in range(2))
    _model(tmp_path / "first.onnx", {"w_a": a, "w_b": b, "w_a2": a})  # one value twice: each copy serves one
    _model(tmp_path / "second.onnx", {"x_a": a, "x_a2": a, "x_b": b})
    report = share_weights(tmp_path / "first.onnx", tmp_path / "second.onnx")
    assert (report.shared, report.own_bytes) == (3, 0) and not (tmp_path / "second.onnx.data").exists()
    loaded = onnx.load(str(tmp_path / "second.onnx"))
    assert [numpy_helper.to_array(t).tolist() for t in loaded.graph.initializer] == [a.tolist(), a.tolist(),
                                                                                     b.tolist()]
