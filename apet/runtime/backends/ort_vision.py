"""The vision graph rewritten in memory for ONNX Runtime's CUDA execution provider: every standard ``Attention``
that the exporter feeds head-major ([B, N, T, D] transposes of [B, T, N, D] reshapes of the projections) reads the
projections in token layout ([B, T, N·D], ``q_num_heads`` / ``kv_num_heads`` set) and hands its output to the next
projection without the transpose back.

Why: ONNX Runtime's flash attention works in token layout, so for head-major inputs it transposes q, k, v and the
output inside the kernel, after the graph's own four transposes have made them head-major: six copies of the
activations per layer that cancel out (0.2 ms of LLaVA-1.5's 3.4 ms CLIP tower on the H200,
docs/benchmarks.md). The values are the same bytes in another order, so the outputs are bit-identical (tested).
Nothing is written next to the artifact: the rewritten graph is handed to ONNX Runtime as bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from apet.runtime.backends.ort_graph_edit import (
    CONTRIB_DOMAIN,
    HEADS_MAJOR,
    ONNX_DOMAINS,
    attributes,
    constant_values,
    consumer_map,
    drop_dead,
    heads_first,
    initializer_dims,
    perm,
    producer_map,
    replace_nodes,
    use_contrib_domain,
)
from apet.runtime.backends.ort_pack import pack_sibling_projections

log = logging.getLogger(__name__)


def _split_shape(producers: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray],
                 reshape: onnx.NodeProto) -> tuple[int, int] | None:
    """(heads, head size) a [B, T, ., .] reshape target names, heads -1 where the exporter left it to the data."""
    shape = constants.get(reshape.input[1])
    if shape is None:
        concat = producers.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat":
            return None
        tail = [constants.get(name) for name in concat.input[2:]]
        if any(part is None for part in tail):
            return None
        shape = np.concatenate([np.ravel(part) for part in tail]) if tail else np.zeros(0)
    else:
        shape = np.ravel(shape)[2:]
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 and shape[1] > 0 else None


def _width(producers: dict[str, onnx.NodeProto], dims: dict[str, list[int]], tensor: str) -> int | None:
    """The last dim of a projection's output: its bias's length or its weight's output features."""
    node = producers.get(tensor)
    if node is None:
        return None
    if node.op_type == "Add":
        widths = [dims[name][0] for name in node.input if len(dims.get(name, ())) == 1]
        return widths[0] if widths else next(
            (w for w in (_width(producers, dims, name) for name in node.input) if w), None)
    if node.op_type == "MatMul" and len(dims.get(node.input[1], ())) == 2:
        return dims[node.input[1]][1]
    return None


def token_layout_attention(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place (see the module's docstring); returns how many Attention nodes now read token
    layout. A node whose inputs or output take another path stays as it is."""
    graph = model.graph
    producers, consumers, constants = producer_map(graph), consumer_map(graph), constant_values(graph)
    dims = initializer_dims(graph)
    removed: set[int] = set()
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ONNX_DOMAINS or any(node.input[3:]) \
                or any(node.output[1:]) or any(a.name in ("q_num_heads", "kv_num_heads") for a in node.attribute):
            continue
        tokens = [heads_first(producers, name) for name in node.input[:3]]
        splits = [producers.get(name) for name in tokens if name is not None]
        if len(splits) != 3 or any(s is None or s.op_type != "Reshape" for s in splits):
            continue
        shapes = [_split_shape(producers, constants, split) for split in splits]
        if any(shape is None for shape in shapes):
            continue
        heads = []
        for split, (count, size) in zip(splits, shapes):
            width = _width(producers, dims, split.input[0]) if count == -1 else count * size
            heads.append(width // size if width and width % size == 0 else None)
        back = consumers.get(node.output[0], [])
        merged = consumers.get(back[0].output[0], []) if len(back) == 1 else []
        if None in heads or heads[1] != heads[2] or len(back) != 1 or back[0].op_type != "Transpose" \
                or perm(back[0]) != HEADS_MAJOR or len(merged) != 1 or merged[0].op_type != "Reshape":
            continue
        del node.input[:3]
        node.input[:0] = [split.input[0] for split in splits]  # the projections, [B, T, N·D]
        node.attribute.extend([helper.make_attribute("q_num_heads", heads[0]),
                               helper.make_attribute("kv_num_heads", heads[1])])
        node.output[0] = merged[0].output[0]  # what the projection after it reads: [B, T, N·D]
        removed.update((id(back[0]), id(merged[0])))
        rewritten += 1
    replace_nodes(graph, {}, removed)
    drop_dead(graph)
    return rewritten


def skip_layer_norms(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place: each ``LayerNormalization`` (last axis) of a residual sum ``h + (x·W + b)``
    becomes one ``SkipLayerNormalization`` (com.microsoft) that adds the bias and the residual and normalizes in one
    kernel, handing the sum on through its fourth output where later nodes read it; returns how many. Why: in a
    replayed CUDA graph every node costs its launch gap, and a pre-norm encoder layer has two such sums (CLIP-L/336:
    46 of them, 92 kernels fewer). The sum is formed in one step instead of two float16 roundings: values within
    float16 rounding, not bit-identical. Off by default (the optional rewrite ``vision-skip-norms``): exact in float32,
    but ONNX Runtime's float16 CUDA kernel changed ApET's kept indices at LLaVA-1.5-7B shapes (docs/benchmarks.md)."""
    graph = model.graph
    producers, consumers = producer_map(graph), consumer_map(graph)
    dims = initializer_dims(graph)
    replaced: dict[int, onnx.NodeProto] = {}
    removed: set[int] = set()
    for norm in graph.node:
        if norm.op_type != "LayerNormalization" or norm.domain not in ONNX_DOMAINS or len(norm.input) != 3 \
                or attributes(norm).get("axis", -1) != -1 or any(norm.output[1:]):
            continue
        residual = producers.get(norm.input[0])
        if residual is None or residual.op_type != "Add":
            continue
        found = None
        for branch, skip in ((0, 1), (1, 0)):  # which side of the residual sum is the biased projection
            biased = producers.get(residual.input[branch])
            if biased is None or biased.op_type != "Add" or len(consumers.get(biased.output[0], [])) != 1:
                continue
            bias = [name for name in biased.input if len(dims.get(name, ())) == 1]
            projection = [name for name in biased.input if name not in bias]
            width = dims.get(norm.input[1], [None])[-1]
            if len(bias) == 1 and len(projection) == 1 and dims[bias[0]][0] == width \
                    and getattr(producers.get(projection[0]), "op_type", None) == "MatMul":
                found = (projection[0], residual.input[skip], bias[0], biased)
        if found is None:
            continue
        projection, skip, bias, biased = found
        later = [n for n in consumers.get(residual.output[0], []) if n is not norm]
        outputs = [norm.output[0], "", "", residual.output[0] if later else ""]
        replaced[id(norm)] = helper.make_node(
            "SkipLayerNormalization", [projection, skip, norm.input[1], norm.input[2], bias], outputs,
            name=f"{norm.name}/skip", domain=CONTRIB_DOMAIN, epsilon=float(attributes(norm).get("epsilon", 1e-5)))
        removed.update((id(residual), id(biased)))
    if not replaced:
        return 0
    replace_nodes(graph, replaced, removed)
    use_contrib_domain(model)
    return len(replaced)


def float_inputs_cast_on_device(model: onnx.ModelProto) -> frozenset[str]:
    """Rewrite ``model`` in place: each float16 graph input is taken as float32 and cast by the graph's first node;
    returns their names. The processor's pixels are float32, and numpy's float32 -> float16 conversion costs about
    1 ms on the host for one 336² image (it is not vectorised), the device's Cast a few µs; both round to nearest
    even, so the graph sees the same values (tested against numpy)."""
    cast = frozenset(i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT16)
    for name in sorted(cast):
        inner = f"{name}/{TensorProto.DataType.Name(TensorProto.FLOAT16).lower()}"
        for node in model.graph.node:
            node.input[:] = [inner if value == name else value for value in node.input]
        model.graph.node.insert(0, helper.make_node("Cast", [name], [inner], name=f"{inner}/cast",
                                                    to=TensorProto.FLOAT16))
        next(i for i in model.graph.input if i.name == name).type.tensor_type.elem_type = TensorProto.FLOAT
    return cast


def load_for_graphs(path: Path, token_layout: bool, cast_inputs: bool, skip_norms: bool = False,
                    pack: bool = False) -> tuple[Path | bytes, frozenset[str]]:
    """The vision graph at ``path`` as the graphed session loads it: rewritten and serialized where a rewrite
    applies (else the path itself), and the names of the inputs it now takes as float32. The serialized graph
    carries the vision weights (the export writes them inline: ~0.6 GB for CLIP-L/336), held in host memory for the
    sessions of later batch sizes."""
    if not token_layout and not cast_inputs and not skip_norms and not pack:
        return path, frozenset()
    model = onnx.load(str(path))
    count = token_layout_attention(model) if token_layout else 0
    norms = skip_layer_norms(model) if skip_norms else 0
    packed = pack_sibling_projections(model) if pack else 0  # after both: they match the projections one by one
    cast = float_inputs_cast_on_device(model) if cast_inputs else frozenset()
    log.info("vision: %d attention nodes read token layout, %d norms add their residual, %d projection groups "
             "packed; inputs cast on the device: %s", count, norms, packed, sorted(cast))
    return (model.SerializeToString() if count or norms or packed or cast else path), cast
