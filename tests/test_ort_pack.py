"""Sibling projections packed into one MatMul (apet/runtime/backends/ort_pack.py): on a small graph against a numpy
float64 oracle (which siblings pack, their biases, what stays alone), ONNX Runtime folding the packed weights into
one initializer when the session loads (nothing computed per run), and the tiny CLIP tower's outputs unchanged.
The LLM graphs' packing runs in tests/test_ort_gqa.py (greedy tokens, logits, stage-2 indices)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import distinct_norm_and_bias_parameters
from onnx import TensorProto, helper, numpy_helper

from apet.errors import BackendError
from apet.manifest import read_manifest
from apet.runtime.backends.ort_options import (
    DEFAULT_REWRITES,
    GRAPH_REWRITES,
    STRICT_NORM_OPTION,
    cuda_provider,
    graph_rewrites,
    names_itself,
)
from apet.runtime.backends.ort_pack import pack_sibling_projections

RNG = np.random.default_rng(7)
WEIGHTS = {"wq": (8, 6), "wk": (8, 4), "wv": (8, 4), "wo": (6, 8), "wx": (5, 3)}


def _graph(opset: int = 17) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [2, 3, 8] read by q, k, v (each with a bias; k and v are graph outputs), q read by o; z by one MatMul."""
    values = {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in WEIGHTS.items()}
    values.update({f"b{s}": RNG.standard_normal(WEIGHTS[f"w{s}"][1]).astype(np.float32) for s in "qkv"})
    nodes = [helper.make_node("MatMul", ["x", f"w{s}"], [f"{s}_mm"], name=f"{s}_proj") for s in "qkv"]
    nodes += [helper.make_node("Add", [f"{s}_mm", f"b{s}"], [s], name=f"{s}_bias") for s in "qkv"]
    nodes += [helper.make_node("MatMul", ["q", "wo"], ["o"], name="o_proj"),
              helper.make_node("MatMul", ["z", "wx"], ["zx"], name="z_proj")]  # alone on its input
    graph = helper.make_graph(
        nodes, "siblings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("o", "k", "v", "zx")],
        [numpy_helper.from_array(value, name) for name, value in values.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), values


def _oracle(feeds: dict[str, np.ndarray], w: dict[str, np.ndarray]) -> list[np.ndarray]:
    x, z = (feeds[name].astype(np.float64) for name in ("x", "z"))
    q, k, v = (x @ w[f"w{s}"] + w[f"b{s}"] for s in "qkv")
    return [q @ w["wo"], k, v, z @ w["wx"]]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimized: str | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, feeds)


def test_siblings_pack_with_their_biases_and_equal_the_oracle(tmp_path) -> None:
    model, weights = _graph()
    feeds = {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32),
             "z": RNG.standard_normal((2, 5)).astype(np.float32)}
    before = _run(model, feeds)
    assert pack_sibling_projections(model, min_siblings=4) == 0  # three siblings
    assert pack_sibling_projections(model) == 1
    ops = collections.Counter(n.op_type for n in model.graph.node)
    # q, k, v: one MatMul, one Add of the concatenated biases, one Split; o and z untouched
    assert ops == {"MatMul": 3, "Concat": 2, "Add": 1, "Split": 1}
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert list(split.output) == ["q", "k", "v"]
    after = _run(model, feeds, str(tmp_path / "optimized.onnx"))
    for got, want, old in zip(after, _oracle(feeds, weights), before):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got, old)  # the same dot products on the CPU
    folded = onnx.load(str(tmp_path / "optimized.onnx"))  # the Concats became one packed initializer at load
    assert not any(n.op_type == "Concat" for n in folded.graph.node)
    packed = [t for t in folded.graph.initializer if list(t.dims) == [8, 14]]
    assert len(packed) == 1
    np.testing.assert_array_equal(numpy_helper.to_array(packed[0]),
                                  np.concatenate([weights[f"w{s}"] for s in "qkv"], axis=1))


def test_a_missing_bias_keeps_biases_apart_and_old_opsets_stay_as_they_are() -> None:
    model, weights = _graph()
    for node in model.graph.node:  # v's bias now reads another tensor: not a constant
        if node.name == "v_bias":
            node.input[1] = "z_bias_input"
    model.graph.input.append(helper.make_tensor_value_info("z_bias_input", TensorProto.FLOAT, [4]))
    assert pack_sibling_projections(model) == 1
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Add"] == 3 and ops["Concat"] == 1  # the biases stay where they were, after the Split
    bias = RNG.standard_normal(4).astype(np.float32)
    feeds = {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32),
             "z": RNG.standard_normal((2, 5)).astype(np.float32), "z_bias_input": bias}
    want = _oracle(feeds, {**weights, "bv": bias})
    for got, expected in zip(_run(model, feeds), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    old, _ = _graph(opset=11)
    assert pack_sibling_projections(old) == 0


def test_the_tiny_clip_tower_packs_each_layer_and_keeps_its_outputs(artifact_factory) -> None:
    artifact = artifact_factory()
    spec = read_manifest(artifact).graphs["vision"]
    model = onnx.load(str(artifact / spec.file))
    assert distinct_norm_and_bias_parameters(model) > 0  # q, k and v each with their own bias: their order shows
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: RNG.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(
        np.float16 if "float16" in i.type else np.float32) for i in session.get_inputs()}
    before = session.run(None, feeds)
    matmuls = sum(n.op_type == "MatMul" for n in model.graph.node)
    layers = pack_sibling_projections(model)
    assert layers >= 2 and sum(n.op_type == "MatMul" for n in model.graph.node) == matmuls - 2 * layers
    for got, want in zip(_run(model, feeds), before):
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
        else:  # ApET's kept indices
            np.testing.assert_array_equal(got, want)


def test_rewrite_names_are_checked() -> None:
    assert graph_rewrites(None) == graph_rewrites("default") == DEFAULT_REWRITES
    assert graph_rewrites("none") == graph_rewrites("") == frozenset()
    assert graph_rewrites("fuse-norms, pack-projections") == {"fuse-norms", "pack-projections"}
    assert graph_rewrites(list(GRAPH_REWRITES)) == set(GRAPH_REWRITES)
    assert graph_rewrites("default,vision-skip-norms") == graph_rewrites(["vision-skip-norms", "default"]) == \
        DEFAULT_REWRITES | {"vision-skip-norms"}
    with pytest.raises(ValueError, match="unknown ONNX Runtime graph rewrite 'pack'.*known: fuse-norms"):
        graph_rewrites("pack")


def test_a_rewrite_is_named_itself_only_by_its_own_name() -> None:
    """What decides whether a rewrite that does not apply warns (named) or is logged at info (from the default)."""
    assert "first-token" in DEFAULT_REWRITES
    assert names_itself("default, first-token", "first-token") and names_itself(["first-token"], "first-token")
    assert not names_itself(None, "first-token") and not names_itself("default", "first-token")
    assert not names_itself("default,first-tokens", "first-token")


def test_fused_norms_are_strict_on_releases_that_took_float16_statistics() -> None:
    """The CUDA provider keeps TF32 off and takes cuDNN's heuristic convolution algorithm always; the fused norms
    run in its strict (float32) mode on an ONNX Runtime older than the one measured to take their statistics in
    float32, and where the version does not parse."""
    base = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    assert cuda_provider() == ("CUDAExecutionProvider", base)
    assert cuda_provider(DEFAULT_REWRITES, "1.31.1")[1] == base
    assert cuda_provider(DEFAULT_REWRITES, "1.32.0")[1] == base
    strict = {**base, STRICT_NORM_OPTION: "1"}
    assert cuda_provider(DEFAULT_REWRITES, "1.24.2")[1] == strict
    assert cuda_provider(frozenset({"vision-skip-norms"}), "1.20.0")[1] == strict
    assert cuda_provider(DEFAULT_REWRITES, "nightly")[1] == strict
    assert cuda_provider(frozenset({"pack-projections"}), "1.20.0")[1] == base  # no fused norm


def test_an_unknown_rewrite_fails_before_any_session(artifact_factory) -> None:
    from apet.runtime.pipeline import Pipeline

    with pytest.raises(BackendError) as err:
        Pipeline.load(artifact_factory(), backend="onnxruntime", ort_rewrites="fuse-norm")
    assert "'fuse-norm'" in str(err.value) and "ort_rewrites" in str(err.value)
