"""What the in-memory rewrites of exported graphs for ONNX Runtime share (:mod:`.ort_gqa`, :mod:`.ort_vision`):
who produces and who reads a tensor, the head-major transpose the exporter puts around attention, and the sweep
that drops what no output needs any more."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEADS_MAJOR = [0, 2, 1, 3]  # [B, T, N, D] <-> [B, N, T, D]
CONTRIB_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (GroupQueryAttention, SkipLayerNormalization, ...)
ONNX_DOMAINS = ("", "ai.onnx")  # the names of the standard domain


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes by name, as values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def producer_map(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output if output}


def consumer_map(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def constant_values(graph: onnx.GraphProto, max_elements: int = 8) -> dict[str, np.ndarray]:
    """The values of the graph's small constants (initializers stored inline, ``Constant`` nodes): the shapes,
    axes and scalars a rewrite reads to recognise a pattern."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if int(np.prod(t.dims)) <= max_elements and t.data_location != TensorProto.EXTERNAL}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def initializer_dims(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Each initializer's dims (known without its data, which may be external)."""
    return {t.name: list(t.dims) for t in graph.initializer}


def replace_nodes(graph: onnx.GraphProto, replaced: dict[int, onnx.NodeProto], removed: set[int]) -> None:
    """The graph's nodes with each one keyed by ``id`` in ``replaced`` swapped for its replacement in place (its
    position keeps the order topological) and those in ``removed`` dropped."""
    kept = [replaced.get(id(node), node) for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(kept)


def use_contrib_domain(model: onnx.ModelProto) -> None:
    """Import ONNX Runtime's contrib domain, once."""
    if not any(opset.domain == CONTRIB_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))


def perm(node: onnx.NodeProto) -> list[int] | None:
    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)


def heads_first(producers: dict[str, onnx.NodeProto], tensor: str) -> str | None:
    """The [B, T, N, D] tensor that ``tensor`` ([B, N, T, D]) is the head-major transpose of, if it is one."""
    node = producers.get(tensor)
    return node.input[0] if node is not None and node.op_type == "Transpose" and perm(node) == HEADS_MAJOR else None


def drop_dead(graph: onnx.GraphProto) -> None:
    """Remove the nodes, inputs and initializers no output depends on any more."""
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
