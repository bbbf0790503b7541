"""ONNX Runtime's static-KV prefill and decode rewritten for GroupQueryAttention (apet/runtime/backends/ort_gqa.py):
the same greedy tokens, logits, stage-2 indices and cache contents as the exported graphs and the torch reference (HF
modules) on the tiny LLaVA with ApET's second stage (two cache groups) and on Qwen3-VL (M-RoPE, q/k norms); left-padded
batches take the exported graph; the artifact is read where it lies (external weights, a read-only symlinked
directory) and never written; graphs the rewrite does not know fail clearly or keep the exported graph.

ONNX Runtime's CPU kernel of the contrib op runs here; the CUDA kernel (flash decoding) runs in the H200 bench."""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TWO_SESSIONS, graphs_on_cpu, make_image
from test_static_kv import _greedy

from apet.contracts.io import LLM_DECODE, LLM_PREFILL
from apet.errors import BackendError
from apet.manifest import read_manifest
from apet.runtime.backends.ort_gqa import NotRewritable, load_rewritten
from apet.runtime.pipeline import Pipeline

STEPS = 10
PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def llava_static_op(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")


def _caches(pipeline: Pipeline) -> list[np.ndarray]:
    static = pipeline.backend.static
    return [value.numpy() for value in static.caches[static.batch]]


def test_gqa_equals_the_exported_graphs_and_torch(llava_static_op, tiny_adapter) -> None:
    """Batch 1 (no padding): the prefill and every step through GroupQueryAttention, both cache groups written where
    the exported graphs write them."""
    image = [make_image(1, (300, 200))]
    gqa_pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa")
    graph_pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="graph")
    gqa, graph = (_greedy(p, image, [PROMPT], STEPS) for p in (gqa_pipeline, graph_pipeline))
    reference = _greedy(Pipeline.load(llava_static_op, backend="torch", adapter=tiny_adapter), image, [PROMPT], STEPS)
    static = gqa_pipeline.backend.static
    assert gqa_pipeline.backend.decode_attention() == "gqa" and list(static.steps) == [(1, True)]
    assert static.gqa_prompt is not None and static.exported_prefill is None  # the prompt took the rewritten graph
    assert graph_pipeline.backend.decode_attention() == "graph"
    for other in (graph, reference):
        assert gqa["tokens"] == other["tokens"]
        np.testing.assert_allclose(gqa["logits"], other["logits"], atol=1e-4, rtol=0)
        assert gqa["lengths"] == other["lengths"]
    np.testing.assert_array_equal(gqa["stage2"], graph["stage2"])
    assert gqa["lengths"][0] - gqa["lengths"][-1] == 40 - 16  # two cache groups
    assert len(set(map(tuple, gqa["tokens"]))) > 1
    for mine, theirs in zip(_caches(gqa_pipeline), _caches(graph_pipeline)):
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)


def test_left_padded_batches_take_the_exported_graph(llava_static_op) -> None:
    images = [make_image(1, (300, 200)), make_image(2, (180, 260))]
    prompts = [PROMPT, "How many objects are there and what color are they?"]
    pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa")
    padded = _greedy(pipeline, images, prompts, 4)
    graph = _greedy(Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="graph"), images, prompts, 4)
    assert list(pipeline.backend.static.steps) == [(2, False)] and pipeline.backend.static.exported_prefill is not None
    assert padded["tokens"] == graph["tokens"]
    np.testing.assert_array_equal(padded["logits"], graph["logits"])


def test_qwen3_gqa_decode_equals_the_exported_graph(qwen3_artifact_factory) -> None:
    """M-RoPE positions [3, B, 1] and q/k norms stay where the export put them, before the write; asked to rotate
    inside the attention (``gqa-rotary``), M-RoPE's chain is not the table form, so its rotary nodes stay too."""
    artifact = qwen3_artifact_factory(ratio=0.3, kv_cache="static", attention="op")
    image, prompt = [make_image(5, (256, 192))], ["What is this?"]
    graph = _greedy(Pipeline.load(artifact, backend="onnxruntime", decode_attention="graph"), image, prompt, STEPS)
    for rewrites in ("default", "gqa-rotary,pack-projections"):
        pipeline = Pipeline.load(artifact, backend="onnxruntime", decode_attention="gqa", ort_rewrites=rewrites)
        gqa = _greedy(pipeline, image, prompt, STEPS)
        assert gqa["tokens"] == graph["tokens"]
        np.testing.assert_allclose(gqa["logits"], graph["logits"], atol=1e-4, rtol=0)
        assert any(n.op_type == "RotaryEmbedding" for n in pipeline.backend.static.gqa.model.graph.node)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_external_weights_are_read_in_place_from_a_read_only_symlinked_artifact(llava_static_op,
                                                                                  tmp_path: Path) -> None:
    """The rewritten graph is serialized in memory; its weights resolve against the artifact directory (as a 7B
    artifact's ``llm_decode.onnx.data``), which may be a read-only mount reached through a symlink."""
    real = tmp_path / "volume" / "artifact"
    shutil.copytree(llava_static_op, real)
    decode = real / read_manifest(real).graphs[LLM_DECODE].file
    model = onnx.load(str(decode))
    onnx.save(model, str(decode), save_as_external_data=True, all_tensors_to_one_file=True,
              location=decode.name + ".data", size_threshold=0)
    assert (real / (decode.name + ".data")).stat().st_size > 0
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    before = _digest(real)
    for path in [real, *real.iterdir()]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        image = [make_image(1, (300, 200))]
        # the re-saved graph is not the exported file any more: its checksum is not the manifest's
        moved = _greedy(Pipeline.load(link, backend="onnxruntime", decode_attention="gqa", verify_checksums=False),
                        image, [PROMPT], 4)
        original = _greedy(Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="graph"), image,
                           [PROMPT], 4)
    finally:
        for path in [real, *real.iterdir()]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert moved["tokens"] == original["tokens"]
    np.testing.assert_allclose(moved["logits"], original["logits"], atol=1e-4, rtol=0)
    assert _digest(real) == before and sorted(os.listdir(real)) == sorted(before)


def test_the_rewrite_replaces_writes_masks_transposes_and_attention(llava_static_op) -> None:
    """Per layer: the cache writes, their index arithmetic, the masks, the head-major transposes and the attention
    become one GroupQueryAttention between the projections (a prefill layer: 88 nodes -> 30)."""
    manifest = read_manifest(llava_static_op)
    spec = manifest.model.decoder
    for graph, prompt in ((LLM_DECODE, False), (LLM_PREFILL, True)):
        path = llava_static_op / manifest.graphs[graph].file
        rewritten = load_rewritten(path, spec, manifest.cache_layout, manifest.max_context, prompt)
        onnx.checker.check_model(rewritten.model)
        ops = [n.op_type for n in rewritten.model.graph.node]
        assert ops.count("GroupQueryAttention") == spec.num_layers
        layer = [n.op_type for n in rewritten.model.graph.node if n.name.startswith("/layers.1/")]
        assert not {"Attention", "ScatterElements", "Where", "Expand", "Transpose", "Shape", "Range"} & set(layer)
        assert layer.count("MatMul") == 7 and layer.count("RotaryEmbedding") == 2
        exported = [n for n in onnx.load(str(path), load_external_data=False).graph.node
                    if n.name.startswith("/layers.1/")]
        assert len(layer) < 0.4 * len(exported)
        inputs = [i.name for i in rewritten.model.graph.input]
        assert "attention_mask" not in inputs and "cache_position" not in inputs
        assert rewritten.groups == 2 and rewritten.capacities == (manifest.max_context, manifest.max_context - 24)
    assert rewritten.seqlens((30, 6), 2)["gqa_seqlens_k.1"].tolist() == [6, 6]
    prompt_feeds = rewritten.prompt((136, 112), 1)
    assert prompt_feeds["gqa_seqlens_k.0"].tolist() == [135] and int(prompt_feeds["gqa_total_length.1"]) == 112


def test_graphs_the_rewrite_does_not_know(llava_static) -> None:
    """The pattern attention form: ``gqa`` asked for explicitly is an error naming the fix; ``auto`` (and the CPU)
    keeps the exported graph."""
    manifest = read_manifest(llava_static)
    with pytest.raises(NotRewritable, match="Attention"):
        load_rewritten(llava_static / manifest.graphs[LLM_DECODE].file, manifest.model.decoder,
                       manifest.cache_layout, manifest.max_context)
    with pytest.raises(BackendError, match="--attention op") as err:
        Pipeline.load(llava_static, backend="onnxruntime", decode_attention="gqa")
    assert "decode_attention='graph'" in str(err.value)
    assert Pipeline.load(llava_static, backend="onnxruntime").backend.decode_attention() == "graph"
    with pytest.raises(BackendError, match="decode attention"):
        Pipeline.load(llava_static, backend="onnxruntime", decode_attention="flash")


@pytest.fixture(scope="module")
def llava_static(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2, kv_cache="static")


def test_the_one_token_fallback_computes_the_same_step(llava_static_op, monkeypatch) -> None:
    """Where the rotary chain is not the exported one, a decode step reshapes the head-major tensors ([B, N, 1, D]
    and [B, 1, N·D] are the same bytes): the same logits as the token-layout rewrite."""
    import onnxruntime as ort

    from apet.runtime.backends import ort_gqa

    manifest = read_manifest(llava_static_op)
    spec, layout, context = manifest.model.decoder, manifest.cache_layout, manifest.max_context
    path = llava_static_op / manifest.graphs[LLM_DECODE].file
    token_layout = load_rewritten(path, spec, layout, context)
    monkeypatch.setattr(ort_gqa, "heads_first", lambda producers, tensor: None)
    fallback = load_rewritten(path, spec, layout, context)
    assert sum(n.op_type == "Transpose" for n in fallback.model.graph.node) > 0
    rng, written = np.random.default_rng(0), 60
    feeds = {"inputs_embeds": rng.standard_normal((1, 1, spec.hidden_size)).astype(np.float32),
             "position_ids": np.array([[written]])}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            cache = np.zeros((1, spec.num_kv_heads, layout.capacity(i, context), spec.head_dim), np.float32)
            cache[:, :, :layout.past_length(i, written)] = rng.standard_normal(
                (1, spec.num_kv_heads, layout.past_length(i, written), spec.head_dim))
            feeds[f"past_{kind}.{i}"] = cache
    lengths = (written, layout.past_length(layout.stage2_layer, written))
    logits = []
    for graph in (token_layout, fallback):
        session = ort.InferenceSession(graph.model.SerializeToString(), providers=["CPUExecutionProvider"])
        logits.append(session.run(["logits"], {**{k: v.copy() for k, v in feeds.items()},
                                               **graph.seqlens(lengths, 1), **graph.totals()})[0])
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5, rtol=0)


def test_bound_prompt_runs_equal_fresh_bindings(llava_static_op) -> None:
    """The prefill bound once per prompt shape (apet/runtime/backends/ort_prompt_graphs.py: on CUDA each shape is
    captured as its own graph): inputs refilled in place, the caches written in place, the same logits, stage-2
    indices and caches as fresh bindings; a new length takes its own binding, past the limit none; host inputs are
    part of the shape. On the CPU the runs are bound but not captured."""
    from apet.runtime.backends.ort_prompt_graphs import PromptGraphs, shape_key

    other_image = [make_image(3, (200, 300))]
    fresh = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa")
    bound = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa")
    assert bound.backend.static.prompt_graphs is None  # CPU: no CUDA graphs to capture
    static = bound.backend.static
    static.prompt_graphs = graphs = PromptGraphs(static.prefill_session, static.setup, limit=2)
    cases = [([make_image(1, (300, 200))], PROMPT), (other_image, PROMPT), (other_image, "Describe it."),
             (other_image, "What color is the largest object in this image?")]
    for images, prompt in cases:
        mine, theirs = (_greedy(p, images, [prompt], 3) for p in (bound, fresh))
        assert mine["tokens"] == theirs["tokens"]
        np.testing.assert_array_equal(mine["logits"], theirs["logits"])
        np.testing.assert_array_equal(mine["stage2"], theirs["stage2"])
        for a, b in zip(_caches(bound), _caches(fresh)):
            np.testing.assert_array_equal(a, b)
    assert len(graphs.runs) == 2 and all(run is not None for run in graphs.runs.values())  # the limit
    shapes = {shape for key in graphs.runs for name, shape, _ in key[0] if name == "inputs_embeds"}
    assert len(shapes) == 2  # one binding per prompt length, reused by the second image at the first length
    device, host = {"x": np.zeros((1, 4), np.float16)}, {"gqa_total_length.0": np.array(7, np.int32)}
    assert shape_key(device, host) != shape_key(device, {"gqa_total_length.0": np.array(8, np.int32)})
    assert shape_key(device, host) == shape_key({"x": np.ones((1, 4), np.float16)}, host)


def test_shape_values_read_as_data_get_device_twins(llava_static_op) -> None:
    """apet/runtime/backends/ort_device_shapes.py on the rewritten prefill (ApET's stage 2 clamps the image span to
    the prompt's length): under the model of ONNX Runtime's CPU placement no kernel reads a host-computed value as
    data afterwards, and every output is bit-equal before and after; a hand-made graph shows the model itself."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from apet.runtime.backends.ort_device_shapes import host_reads, placed_on_cpu, to_device

    manifest = read_manifest(llava_static_op)
    spec, layout, context = manifest.model.decoder, manifest.cache_layout, manifest.max_context
    graph = load_rewritten(llava_static_op / manifest.graphs[LLM_PREFILL].file, spec, layout, context, prompt=True)
    host = frozenset(graph.totals())
    before = onnx.ModelProto()
    before.CopyFrom(graph.model)
    reads = host_reads(graph.model, host)
    assert reads and all(graph.model.graph.node[i].name.startswith("/apet_stage2/") for i, _ in reads)
    assert to_device(graph.model, host) > 0 and host_reads(graph.model, host) == []
    read = {name for node in graph.model.graph.node for name in node.input}
    assert all(t.name in read for t in graph.model.graph.initializer)  # ONNX Runtime warns of unused ones
    rng, length = np.random.default_rng(0), 70
    feeds = {"inputs_embeds": rng.standard_normal((1, length, spec.hidden_size)).astype(np.float32),
             "position_ids": np.arange(length)[None], "image_start": np.array([5]),
             **graph.prompt(tuple(layout.present_length(layer, 0, length) for layer in graph.group_layers), 1)}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = np.zeros((1, spec.num_kv_heads, layout.capacity(i, context), spec.head_dim),
                                                 np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(llava_static_op))
    outputs = [ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
               .run(None, {k: v.copy() for k, v in feeds.items()}) for model in (before, graph.model)]
    for mine, theirs in zip(*outputs):
        np.testing.assert_array_equal(mine, theirs)

    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
             helper.make_node("Sub", ["length", "two"], ["last"]),
             helper.make_node("Abs", ["start"], ["begin"]),  # a device tensor (a graph input would go to the host)
             helper.make_node("Min", ["begin", "last"], ["clamped"]),  # data: read on the device
             helper.make_node("Reshape", ["x", "shape"], ["y"])]  # a host input of Reshape: no copy
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"]),
                     helper.make_tensor_value_info("start", TensorProto.INT64, [])],
        [helper.make_tensor_value_info(n, t, None) for n, t in (("clamped", TensorProto.INT64),
                                                                 ("y", TensorProto.FLOAT))],
        [onnx.numpy_helper.from_array(np.array(1), "one"), onnx.numpy_helper.from_array(np.array(2), "two")]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert host_reads(model) == [(4, 1)]
    to_device(model)
    assert host_reads(model) == []
    # the twin is one device kernel, Range (a Reshape on the device is a view); its other nodes are host arithmetic
    twin = [n.op_type for i, n in enumerate(model.graph.node)
            if n.output[0].startswith("last/device") and i not in placed_on_cpu(model) and n.op_type != "Constant"]
    assert twin == ["Range", "Reshape"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for start, n in ((9, 6), (1, 6), (3, 1)):
        clamped, _ = session.run(None, {"x": np.zeros((2, n), np.float32), "start": np.array(start)})
        assert int(clamped) == min(start, n - 2)  # n - 2 = -1 for the last: negative values too
    # values past float32's 2^24 (the twin summed ones before): a host value scaled by 2^40, clamped on the device
    nodes[2] = helper.make_node("Mul", ["length", "two"], ["last"])
    scaled = helper.make_model(helper.make_graph(
        nodes, "g", list(model.graph.input), list(model.graph.output),
        [onnx.numpy_helper.from_array(np.array(1), "one"), onnx.numpy_helper.from_array(np.array(2**40), "two")]),
        opset_imports=[helper.make_opsetid("", 17)])
    to_device(scaled)
    assert host_reads(scaled) == []
    session = ort.InferenceSession(scaled.SerializeToString(), providers=["CPUExecutionProvider"])
    for start in (2**40 * 6 - 1, 2**40 * 6 + 1):
        clamped, _ = session.run(None, {"x": np.zeros((2, 6), np.float32), "start": np.array(start)})
        assert int(clamped) == min(start, 6 * 2**40)
    # ONNX Runtime places nodes before inputs are bound: only CPU outputs (Shape's) start its search, so arithmetic on
    # a graph input bound on the host stays on the device; it reads that input as data (copied at each run) and an
    # index range built from it goes back to the host. Stage 2's cut fed the prompt's length so and was refused its
    # CUDA graph (docs/benchmarks.md stop 59); a twin cannot help (its arithmetic would stay on the device too)
    bound = helper.make_model(helper.make_graph(
        [helper.make_node("Sub", ["count", "one"], ["less"]),
         helper.make_node("Range", ["zero", "less", "one"], ["r"]), helper.make_node("Abs", ["count"], ["size"])],
        "g", [helper.make_tensor_value_info("count", TensorProto.INT64, [])],
        [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("r", "size")],
        [onnx.numpy_helper.from_array(np.array(0), "zero"), onnx.numpy_helper.from_array(np.array(1), "one")]),
        opset_imports=[helper.make_opsetid("", 17)])
    host = frozenset({"count"})
    assert placed_on_cpu(bound) == set()
    assert host_reads(bound, host) == [(0, 0), (1, 1), (2, 0)]
    assert to_device(bound, host) == 0 and host_reads(bound, host) == [(0, 0), (1, 1), (2, 0)]


def test_expand_shapes_of_constants_stay_on_the_host(tmp_path) -> None:
    """The torch exporter's expand(..., -1) (rotary embeddings in older transformers: on the H200 ONNX Runtime
    copied its Where back to Expand's host input, ort_gqa_check_3.json): ConstantOfShape(Shape(t)) of a static t is
    folded, so the shape arithmetic stays on the host; the same values at other batch and sequence sizes."""
    import io

    import onnxruntime as ort
    import torch

    from apet.runtime.backends.ort_device_shapes import host_reads, to_device

    class Expanding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("inv", torch.arange(4).float())

        def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            freqs = self.inv[None, :, None].expand(positions.shape[0], -1, 1)
            return (freqs @ positions[:, None, :].float()).transpose(1, 2) + x

    buffer = io.BytesIO()
    torch.onnx.export(Expanding(), (torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)), buffer,
                      input_names=["x", "positions"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "b", 1: "s"}, "positions": {0: "b", 1: "s"}})
    model = onnx.load_from_string(buffer.getvalue())
    before = model.SerializeToString()
    reads = host_reads(model)
    assert any(model.graph.node[i].op_type == "Expand" and slot == 1 for i, slot in reads)
    to_device(model)
    assert host_reads(model) == [] and not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    rng = np.random.default_rng(1)
    for batch, length in ((2, 5), (3, 9)):
        feeds = {"x": rng.standard_normal((batch, length, 4)).astype(np.float32),
                 "positions": np.arange(batch * length).reshape(batch, length)}
        outputs = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                   for m in (before, model.SerializeToString())]
        np.testing.assert_array_equal(*outputs)


@pytest.mark.parametrize("rewrite", ["fuse-norms", "pack-projections", "gqa-rotary", "gqa-rotary,pack-projections"])
def test_optional_rewrites_compute_the_same_steps(llava_static_op, rewrite) -> None:
    """The optional rewrites of both GroupQueryAttention graphs (apet/runtime/backends/ort_options.py): prefill plus
    greedy steps give the unrewritten graphs' tokens, logits and stage-2 indices, and each rewrote what it names.

    - ``fuse-norms`` (ort_norms.py): every residual sum and the RMSNorm after it become one
      SkipSimplifiedLayerNormalization (not the first layer's input norm, nor the one after ApET's stage 2, nor the
      prefill's final norm of the last row: none reads a sum);
    - ``pack-projections`` (ort_pack.py): each layer's q/k/v and its gate/up are one MatMul and a Split each;
    - ``gqa-rotary`` (ort_rotary.py): GroupQueryAttention rotates q and k from cos/sin tables at the positions the
      graph rotated them at (both cache groups: the layers after ApET's stage 2 at their shifted positions), no
      RotaryEmbedding left; with ``pack-projections`` it reads q/k/v packed (no split for them)."""
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend

    manifest = read_manifest(llava_static_op)
    layers = manifest.model.decoder.num_layers
    image = [make_image(1, (300, 200))]
    runs, counts = {}, {}
    for chosen in ((), tuple(rewrite.split(","))):
        backend = OnnxRuntimeBackend(llava_static_op, manifest, decode_attention="gqa", rewrites=chosen)
        assert backend.rewrites == frozenset(chosen)
        runs[bool(chosen)] = _greedy(Pipeline(llava_static_op, manifest, backend), image, [PROMPT], STEPS)
        graphs = {"decode": backend.static.gqa.model.graph, "prefill": backend.static.gqa_prompt.model.graph}
        counts[bool(chosen)] = {name: collections.Counter(n.op_type for n in graph.node)
                                for name, graph in graphs.items()}
    before, after = counts[False], counts[True]
    if rewrite == "fuse-norms":
        assert {name: c["SkipSimplifiedLayerNormalization"] for name, c in after.items()} == \
            {"decode": 2 * layers, "prefill": 2 * layers - 2}
    for name in ("decode", "prefill"):
        if "pack-projections" in rewrite:  # 7 projections per layer -> 3 (q/k/v, gate/up; o and down alone)
            assert before[name]["MatMul"] - after[name]["MatMul"] == 3 * layers
            # a split after q/k/v and one after gate/up; none after q/k/v where the attention reads them packed
            assert after[name]["Split"] - before[name]["Split"] == (1 if "gqa-rotary" in rewrite else 2) * layers
        if "gqa-rotary" in rewrite:
            assert (before[name]["RotaryEmbedding"], after[name]["RotaryEmbedding"]) == (2 * layers, 0)
    assert all(c["SkipSimplifiedLayerNormalization"] == 0 for c in before.values())
    assert runs[True]["tokens"] == runs[False]["tokens"]
    np.testing.assert_allclose(runs[True]["logits"], runs[False]["logits"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(runs[True]["stage2"], runs[False]["stage2"])


def test_rotary_tables_hold_the_graphs_own_cos_and_sin(llava_static_op) -> None:
    """apet/runtime/backends/ort_rotary.py: the table of each rotary input, read at the positions the graph was fed,
    equals the cos/sin the exported graph computes from them (a uniform shift of the positions would leave the
    greedy tokens of the test above unchanged: rotary attention sees only differences of positions)."""
    from apet.runtime.backends.ort_graph_edit import producer_map
    from apet.runtime.backends.ort_rotary import RotaryChains

    manifest = read_manifest(llava_static_op)
    model = onnx.load(str(llava_static_op / manifest.graphs[LLM_PREFILL].file), load_external_data=False)
    rotary = next(n for n in model.graph.node if n.op_type == "RotaryEmbedding" and n.name.startswith("/layers.0/"))
    chains = RotaryChains(model.graph, producer_map(model.graph))
    tables = [chains.table(name, manifest.max_context) for name in rotary.input[1:]]
    assert all(t is not None and t.positions == "position_ids" for t in tables)
    assert tables[0].table.shape == (manifest.max_context, manifest.model.decoder.head_dim // 2)
    graph = onnx.utils.Extractor(model).extract_model(["position_ids"], list(rotary.input[1:]))
    positions = np.array([[0, 1, 2, 7, 8, 40], [3, 4, 5, 6, 200, 255]], dtype=np.int64)
    cos, sin = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"position_ids": positions})
    np.testing.assert_allclose(tables[0].table[positions], cos, rtol=0, atol=2e-7)
    np.testing.assert_allclose(tables[1].table[positions], sin, rtol=0, atol=2e-7)
    assert chains.table(rotary.input[0], manifest.max_context) is None  # not a rotary input: no table


def _batches(pipeline: Pipeline) -> list[dict]:
    """Greedy runs at batch 1, 2 and 1 again (one prompt per row: no left padding, so every step is rewritten)."""
    image = [make_image(1, (300, 200))]
    two = [make_image(2, (180, 260)), make_image(3, (260, 180))]
    return [_greedy(pipeline, images, [PROMPT] * len(images), 4) for images in (image, two, image)]


@pytest.mark.parametrize("failure", [None, "session", "capture"])
def test_every_batch_size_decodes_in_one_session(llava_static_op, failure) -> None:
    """With CUDA graphs, the decode steps of every batch size run in one session, each size its own graph id (each
    ONNX Runtime session holds its own copy of the weights): the same tokens and logits as the session without CUDA
    graphs. Where ONNX Runtime refuses that session (``session``) or a capture fails in a run (``capture``), each
    batch size takes its own fixed-shape session, and the tokens stay the same."""
    # two sessions: the sessions counted below are decode's alone
    reference = _batches(Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa",
                                       ort_rewrites=TWO_SESSIONS))
    pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa",
                             ort_rewrites=TWO_SESSIONS)
    static = pipeline.backend.static
    made: list[bool] = []  # per session made: shape graphs?
    setup = graphs_on_cpu(static.setup, failure, made)
    static.setup = setup
    runs = _batches(pipeline)
    for mine, theirs in zip(runs, reference):
        assert mine["tokens"] == theirs["tokens"]
        np.testing.assert_allclose(mine["logits"], theirs["logits"], atol=1e-5, rtol=0)
    sessions = {batch: step.session for (batch, gqa), step in static.steps.items() if gqa}
    assert set(sessions) == {1, 2}
    if failure is None:
        from apet.runtime.backends.ort_device_shapes import host_reads

        assert static.graphed_shared == {True: True} and made == [True]
        # with its dims free, no kernel reads a host-computed value as data (ONNX Runtime would refuse the graphs)
        assert host_reads(onnx.load_from_string(static._device_shaped(True)), static.gqa.host_inputs) == []
        assert sessions[1] is sessions[2] is static.graph_sessions[True].shared
        assert all(step.run_options is not None for step in static.steps.values())
    else:  # the sessions made after the refusal: one per batch size, shapes fixed
        assert static.graphed_shared == {True: False} and made == [True, False, False]
        assert sessions[1] is not sessions[2]
        assert all(step.run_options is None for step in static.steps.values())
