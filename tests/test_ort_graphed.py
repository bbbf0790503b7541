"""The vision graph at fixed shapes with bound buffers (apet/runtime/backends/ort_graphed.py), what ONNX Runtime's CUDA
execution provider replays as a CUDA graph: the same outputs as the plain session, every batch size in one session
with CUDA graphs (a session per batch size where ONNX Runtime refuses that one), and only where the artifact fixes
every dim but the batch. CUDA-graph capture itself runs in the H200 bench."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import distinct_norm_and_bias_parameters, graphs_on_cpu, make_image

from apet.manifest import read_manifest
from apet.runtime.backends.ort_graphed import GraphedVision, fixed_shapes
from apet.runtime.backends.ort_options import session_options
from apet.runtime.backends.ort_session import SessionSetup
from apet.runtime.pipeline import Pipeline


def _setup(cuda_graphs: bool, device_type: str = "cpu") -> SessionSetup:
    return SessionSetup(ort, session_options(ort), ["CPUExecutionProvider"], device_type, cuda_graphs)


def test_bound_vision_runs_equal_the_plain_session(artifact_factory) -> None:
    artifact = artifact_factory()
    manifest = read_manifest(artifact)
    spec = manifest.graphs["vision"]
    pipeline = Pipeline.load(artifact, backend="onnxruntime")
    images = [make_image(1), make_image(2, (180, 260))]
    for batch in (1, 2):
        arrays = pipeline.processor.vision_inputs(images[:batch]).arrays
        plain = pipeline.backend.vision.run(None, arrays)
        graphed = GraphedVision(artifact / spec.file, spec, _setup(False))
        for _ in range(2):  # the second run refills the same bound buffers
            outputs = graphed(arrays)
            for name, expected in zip([o["name"] for o in spec.outputs], plain):
                if expected.dtype.kind == "f":  # a fixed batch lets ONNX Runtime fold shapes: other float kernels
                    np.testing.assert_allclose(outputs[name], expected, atol=1e-5, rtol=0)
                else:  # the kept indices
                    np.testing.assert_array_equal(outputs[name], expected)
        assert list(graphed.runs) == [batch]


@pytest.mark.parametrize("failure", [None, "session", "capture"])
def test_every_batch_size_runs_in_one_vision_session(artifact_factory, failure) -> None:
    """With CUDA graphs, every batch size's vision graph lives in one session (each ONNX Runtime session loads the
    vision weights), picked by its graph id: the same kept indices and visual tokens as the plain session at batch
    1, 2 and 1 again. Where ONNX Runtime refuses that session or a capture in it fails, each batch size gets its own
    fixed-batch session, with the same outputs."""
    artifact = artifact_factory()
    spec = read_manifest(artifact).graphs["vision"]
    pipeline = Pipeline.load(artifact, backend="onnxruntime")
    images = [make_image(1), make_image(2, (180, 260))]
    made: list[bool] = []
    graphed = GraphedVision(artifact / spec.file, spec, graphs_on_cpu(_setup(True), failure, made))
    for batch in (1, 2, 1):
        arrays = pipeline.processor.vision_inputs(images[:batch]).arrays
        plain = pipeline.backend.vision.run(None, arrays)
        outputs = graphed(arrays)
        for name, expected in zip([o["name"] for o in spec.outputs], plain):
            if expected.dtype.kind == "f":
                np.testing.assert_allclose(outputs[name], expected, atol=1e-5, rtol=0)
            else:
                np.testing.assert_array_equal(outputs[name], expected)
    sessions = {batch: run.session for batch, run in graphed.runs.items()}
    assert set(sessions) == {1, 2}
    if failure is None:
        assert made == [True] and sessions[1] is sessions[2] is graphed.sessions.shared
        assert all(run.run_options is not None for run in graphed.runs.values())
    else:
        assert graphed.sessions.shared is False and made == [True, False, False] and sessions[1] is not sessions[2]
        assert all(run.run_options is None for run in graphed.runs.values())


def test_graphed_vision_applies_only_to_fixed_shapes_on_cuda(artifact_factory, qwen_artifact_factory) -> None:
    llava = read_manifest(artifact_factory()).graphs["vision"]
    qwen = read_manifest(qwen_artifact_factory()).graphs["vision"]
    assert fixed_shapes(llava.inputs, 3)["pixel_values"][0][0] == 3
    assert fixed_shapes(qwen.inputs, 1) is None  # patches of a dynamic image size
    assert GraphedVision.of(artifact_factory() / llava.file, llava, _setup(True, "cuda")) is not None
    for setup in (_setup(True, "cpu"), _setup(False, "cuda")):
        assert GraphedVision.of(artifact_factory() / llava.file, llava, setup) is None
    assert GraphedVision.of(qwen_artifact_factory() / qwen.file, qwen, _setup(True, "cuda")) is None


def test_token_layout_attention_is_bit_identical(artifact_factory) -> None:
    """The vision graph's attention fed in token layout (apet/runtime/backends/ort_vision.py): every layer's
    Attention rewritten, the head-major transposes gone, the same bytes out; and the graphed session built from
    it, with a graph transformer left out, gives the exported session's outputs."""
    import collections

    import onnx

    from apet.runtime.backends.ort_graphed import VisionSessionForm
    from apet.runtime.backends.ort_vision import token_layout_attention

    artifact = artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")
    spec = read_manifest(artifact).graphs["vision"]
    model = onnx.load(str(artifact / spec.file))
    before = collections.Counter(n.op_type for n in model.graph.node)
    attention = before["Attention"]
    assert attention >= 2 and token_layout_attention(model) == attention
    after = collections.Counter(n.op_type for n in model.graph.node)
    assert after["Attention"] == attention and before["Transpose"] - after["Transpose"] == 4 * attention
    for node in model.graph.node:
        if node.op_type == "Attention":
            heads = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert heads["q_num_heads"] == heads["kv_num_heads"] > 1
    assert token_layout_attention(model) == 0  # rewritten nodes are left alone
    onnx.checker.check_model(model)
    pixels = np.random.default_rng(0).standard_normal((2, 3, *spec.inputs[0]["shape"][2:])).astype(np.float32)
    exported = ort.InferenceSession(str(artifact / spec.file), providers=["CPUExecutionProvider"])
    expected = exported.run(None, {"pixel_values": pixels})
    rewritten = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(rewritten.run(None, {"pixel_values": pixels}), expected):
        np.testing.assert_array_equal(got, want)
    form = VisionSessionForm(token_layout=True, disabled_optimizers=("MatMulAddFusion",))
    graphed = GraphedVision(artifact / spec.file, spec, _setup(False), form)
    outputs = graphed({"pixel_values": pixels})
    assert isinstance(graphed._model, bytes)  # the rewritten graph, not the file
    for name, want in zip([o["name"] for o in spec.outputs], expected):
        if want.dtype.kind == "f":
            np.testing.assert_allclose(outputs[name], want, atol=1e-5, rtol=0)
        else:
            np.testing.assert_array_equal(outputs[name], want)


def test_float16_inputs_cast_on_the_device_round_as_numpy_does() -> None:
    """apet/runtime/backends/ort_vision.py takes a float16 input as float32 and casts it in the graph: ONNX Runtime's
    Cast rounds as numpy's astype does (ties to even, overflow to inf, subnormals), bit for bit."""
    import onnx
    from onnx import TensorProto, helper

    from apet.runtime.backends.ort_vision import float_inputs_cast_on_device

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["pixels", "one"], ["y"])], "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT16, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None])],
        [onnx.numpy_helper.from_array(np.array([1.0], np.float16), "one")]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert float_inputs_cast_on_device(model) == {"pixels"}
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.node[0].op_type == "Cast"
    values = np.array([0.1, 1 / 3, -2.5, 65504, 65519.99, 65520, 7e4, -7e4, 1e-8, 2.9802322e-8, 6e-8, 1 + 2 ** -11,
                       1 + 3 * 2 ** -11, 2049.0, 2051.0, -0.0, 0.0], np.float32)
    values = np.concatenate([values, np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 300])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixels": values})
    with np.errstate(over="ignore"):  # 65520 and beyond round to inf, as they should
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_graphed_vision_sends_float_pixels_for_the_device_to_cast(tmp_path) -> None:
    """GraphedVision over a float16 graph with ``cast_inputs``: it binds float32, sends the processor's float32
    pixels as they are and rounds float64 ones to float16 first, so every path gives numpy's float16 values."""
    import onnx
    from onnx import TensorProto, helper

    from apet.manifest import GraphEntry
    from apet.runtime.backends.ort_graphed import VisionSessionForm

    path = tmp_path / "vision.onnx"
    onnx.save(helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["pixel_values", "one"], ["out"])], "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT16, ["batch", 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["batch", 64])],
        [onnx.numpy_helper.from_array(np.array([1.0], np.float16), "one")]),
        opset_imports=[helper.make_opsetid("", 17)]), str(path))
    spec = GraphEntry(file=path.name, inputs=[{"name": "pixel_values", "shape": ["batch", 64], "dtype": "float16"}],
                      outputs=[{"name": "out", "shape": ["batch", 64], "dtype": "float16"}])
    form = VisionSessionForm(token_layout=False, cast_inputs=True, disabled_optimizers=())
    graphed = GraphedVision(path, spec, _setup(False), form)
    pixels = np.random.default_rng(0).standard_normal((2, 64)) * 100 + 1 / 3  # float64
    pixels[:, :4] = 1 + 2 ** -11 + 2 ** -40  # float16 rounds it up; through float32 it is a tie and rounds down
    assert pixels.astype(np.float32).astype(np.float16)[0, 0] != pixels.astype(np.float16)[0, 0]
    for array in (pixels, pixels.astype(np.float32)):
        out = graphed({"pixel_values": array})["out"]
        assert graphed.runs[2].input_types["pixel_values"] == np.float32
        np.testing.assert_array_equal(out.view(np.uint16), array.astype(np.float16).view(np.uint16))
    assert graphed._float32_inputs == {"pixel_values"} and isinstance(graphed._model, bytes)
    plain = GraphedVision(path, spec, _setup(False), VisionSessionForm(token_layout=False, cast_inputs=False))
    np.testing.assert_array_equal(plain({"pixel_values": pixels})["out"], pixels.astype(np.float16))
    assert plain.runs[2].input_types["pixel_values"] == np.float16 and plain._model == path


def test_skip_layer_norms_fold_bias_and_residual_into_the_norm(artifact_factory) -> None:
    """apet/runtime/backends/ort_vision.py ``skip_layer_norms`` on the tiny CLIP tower: every LayerNorm of a residual
    sum (two per layer, less layer 0's first) becomes one SkipLayerNormalization, the sums go on through its fourth
    output, and the outputs stay within float rounding with the kept indices equal: every norm and bias given its own
    values first, so a norm wired to another layer's parameters would show."""
    import collections

    import onnx

    from apet.runtime.backends.ort_vision import skip_layer_norms, token_layout_attention

    artifact = artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")
    spec = read_manifest(artifact).graphs["vision"]
    model = onnx.load(str(artifact / spec.file))
    assert distinct_norm_and_bias_parameters(model) >= 4 * 2
    exported = model.SerializeToString()
    before = collections.Counter(n.op_type for n in model.graph.node)
    layers = before["Attention"]
    token_layout_attention(model)
    assert skip_layer_norms(model) == 2 * layers - 1
    after = collections.Counter(n.op_type for n in model.graph.node)
    assert after["SkipLayerNormalization"] == 2 * layers - 1
    assert before["Add"] - after["Add"] == 2 * (2 * layers - 1)  # the bias and the residual add of each
    assert before["LayerNormalization"] - after["LayerNormalization"] == 2 * layers - 1
    onnx.checker.check_model(model)
    assert skip_layer_norms(model) == 0
    pixels = np.random.default_rng(1).standard_normal((2, 3, *spec.inputs[0]["shape"][2:])).astype(np.float32)
    expected = ort.InferenceSession(exported, providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels})
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels})
    np.testing.assert_allclose(got[0], expected[0], atol=2e-5 * np.abs(expected[0]).max(), rtol=0)
    np.testing.assert_array_equal(got[1], expected[1])
