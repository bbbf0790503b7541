"""The static form's weights bound once for both ONNX Runtime sessions (apet/runtime/backends/ort_bound_weights.py,
the optional rewrite ``share-weights``): the lifted graphs compute what the graphs with their initializers compute,
the prefill's and the decode's sessions read the same buffers (by where the bytes lie, or by their bytes), a packed
weight is concatenated once, and small constants stay in the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_image
from onnx import TensorProto, helper, numpy_helper
from test_static_kv import _greedy

from apet.runtime.backends import ort_bound_weights
from apet.runtime.backends.ort_bound_weights import BoundWeights
from apet.runtime.pipeline import Pipeline


def _external(name: str, values: np.ndarray, location: str, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=values.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(values.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _model(nodes, initializers, outputs) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                 for o in outputs], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, directory: Path, x: np.ndarray, bound: dict | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    for name, value in (bound or {}).items():
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cpu")
    session.run_with_iobinding(binding)
    return [value.numpy() for value in binding.get_outputs()]


def test_weights_where_the_bytes_lie_are_bound_once(tmp_path, monkeypatch) -> None:
    """Two graphs naming one external weight differently (as the exporter names the prefill's and the decode's) get
    the same buffer; a Concat of weights (a packed projection) becomes one input holding the concatenation; a small
    constant stays an initializer; the outputs equal the graphs run with their initializers."""
    monkeypatch.setattr(ort_bound_weights, "MIN_BYTES", 64)
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 16), dtype=np.float32), rng.standard_normal((8, 4), dtype=np.float32)
    (tmp_path / "weights.bin").write_bytes(w1.tobytes() + w2.tobytes())
    small = numpy_helper.from_array(np.full((4,), 0.5, np.float32), "small")
    first = _model([helper.make_node("Concat", ["w1", "w2"], ["packed"], axis=1),
                    helper.make_node("MatMul", ["x", "packed"], ["y"]),
                    helper.make_node("MatMul", ["x", "w1"], ["z"]),
                    helper.make_node("MatMul", ["x", "w2"], ["u"]), helper.make_node("Add", ["u", "small"], ["v"])],
                   [_external("w1", w1, "weights.bin", 0), _external("w2", w2, "weights.bin", w1.nbytes), small],
                   ["y", "z", "v"])
    second = _model([helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["z"])],
                    [_external("onnx::MatMul_7", w1, "weights.bin", 0)], ["z"])
    x = rng.standard_normal((2, 8), dtype=np.float32)
    want = [_run(m, tmp_path, x) for m in (first, second)]
    store = BoundWeights(ort, "cpu", tmp_path)
    lifted = [onnx.ModelProto(), onnx.ModelProto()]
    for copy, model in zip(lifted, (first, second)):
        copy.CopyFrom(model)
    bound = [store.lift(model) for model in lifted]
    assert sorted(bound[0]) == ["packed", "w1", "w2"] and sorted(bound[1]) == ["onnx::MatMul_7"]
    assert bound[1]["onnx::MatMul_7"] is bound[0]["w1"]  # one buffer for the two graphs' names
    assert len(store.values) == 3 and store.bytes == 2 * (w1.nbytes + w2.nbytes)
    np.testing.assert_array_equal(bound[0]["packed"].numpy(), np.concatenate([w1, w2], axis=1))
    assert [t.name for t in lifted[0].graph.initializer] == ["small"] and not lifted[1].graph.initializer
    assert not any(node.op_type == "Concat" for node in lifted[0].graph.node)
    for model, theirs, mine in zip(lifted, want, bound):
        for got, expected in zip(_run(model, tmp_path, x, mine), theirs):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def llava_static_op(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")


def test_the_prefill_and_decode_sessions_read_one_copy(llava_static_op, monkeypatch) -> None:
    """On the tiny LLaVA (stage 2, two cache groups) with the default rewrites (projections packed): every weight the
    decode graph reads is one of the prefill's buffers, neither graph keeps a large initializer, and greedy tokens,
    logits and stage-2 indices equal the sessions that hold their own copies, at batch 1 and 2."""
    monkeypatch.setattr(ort_bound_weights, "MIN_BYTES", 4096)  # the tiny model's weights are a few kB
    mine = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa",
                         ort_rewrites="default,share-weights")
    theirs = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa")
    static = mine.backend.static
    prompt, decode = static.prompt_weights, static.decode_weights
    assert len(decode) > 10 and len(prompt) >= len(decode)
    held = {id(value) for value in prompt.values()}
    assert all(id(value) in held for value in decode.values())  # the decode step reads the prefill's buffers
    assert any(name.endswith("packed_weight") for name in decode)  # packed projections: concatenated once
    for graph in (static.gqa.model, static.gqa_prompt.model):
        assert all(ort_bound_weights._nbytes(t) < 4096 for t in graph.graph.initializer)
    images = [make_image(1, (300, 200)), make_image(2, (180, 260))]
    for batch in (1, 2):
        got, want = (_greedy(p, images[:batch], ["What is in the picture?"] * batch, 6) for p in (mine, theirs))
        assert got["tokens"] == want["tokens"]
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(got["stage2"], want["stage2"])


def test_share_weights_says_where_it_does_not_apply(llava_static_op, caplog) -> None:
    """Asked for with the exported graphs (``decode_attention="graph"``, the CPU's default), share-weights has
    nothing to bind: the sessions keep their own weights and the log says why."""
    with caplog.at_level("WARNING", logger="apet.runtime.backends.ort_static"):
        pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="graph",
                                 ort_rewrites="default,share-weights")
    assert pipeline.backend.static.prompt_weights == {} == pipeline.backend.static.decode_weights
    assert any("share-weights applies to the graphs rewritten for GroupQueryAttention" in r.message
               for r in caplog.records)
