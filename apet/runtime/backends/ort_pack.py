"""Sibling projections packed into one: the ``MatMul`` nodes that read the same activation with constant weights
[K, N_i] (a layer's q, k and v; its gate and up) become one ``MatMul`` over the weights concatenated along N, and a
``Split`` back into the tensors the graph had. Where every sibling's only reader adds a constant bias [N_i] (CLIP's
q/k/v), the biases are packed too: one ``Add`` before the ``Split``.

Why: replayed as a CUDA graph, every node costs its launch gap on top of its work (docs/benchmarks.md,
``h200-vision/``), and a decode step's thin GEMMs read their weights faster as one wide GEMM (fewer split-K
reductions). Three projections and three bias adds become a GEMM, an add and a split.

The packed weight is a ``Concat`` of the artifact's initializers: ONNX Runtime's constant folding turns it into one
initializer when the session loads, so nothing is written and the artifact's weight files are read where they lie
(the session holds the packed copy instead of the three). Each output element is the same dot product over K;
a GEMM of another width may pick another kernel, so float16 roundings can differ (not bit-identical on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from apet.runtime.backends.ort_graph_edit import ONNX_DOMAINS, consumer_map, initializer_dims


@dataclass(frozen=True)
class _Sibling:
    matmul: onnx.NodeProto
    width: int  # N_i
    bias: onnx.NodeProto | None  # the Add of a constant [N_i] that is the MatMul's only reader
    bias_name: str | None

    @property
    def output(self) -> str:
        """The tensor the graph reads after this projection (its bias added, where packed)."""
        return (self.bias if self.bias is not None else self.matmul).output[0]


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 0)


def _siblings(graph: onnx.GraphProto, dims: dict[str, list[int]],
              types: dict[str, int]) -> dict[str, list[_Sibling]]:
    """Per activation, the MatMuls that read it with a 2-D initializer as weights (in graph order)."""
    consumers = consumer_map(graph)
    groups: dict[str, list[_Sibling]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(dims.get(node.input[1], ())) != 2 or node.input[0] in dims:
            continue
        width = dims[node.input[1]][1]
        readers = consumers.get(node.output[0], [])
        bias, bias_name = None, None
        if len(readers) == 1 and readers[0].op_type == "Add":
            other = [name for name in readers[0].input if name != node.output[0]]
            if len(other) == 1 and dims.get(other[0]) == [width] and types[other[0]] == types[node.input[1]]:
                bias, bias_name = readers[0], other[0]
        groups.setdefault(node.input[0], []).append(_Sibling(node, width, bias, bias_name))
    return groups


def _packable(group: list[_Sibling], dims: dict[str, list[int]], types: dict[str, int]) -> list[_Sibling]:
    """The group's siblings that share K and the weights' dtype with its first one."""
    first = group[0].matmul.input[1]
    return [s for s in group if dims[s.matmul.input[1]][0] == dims[first][0]
            and types[s.matmul.input[1]] == types[first]]


def pack_sibling_projections(model: onnx.ModelProto, min_siblings: int = 2) -> int:
    """Rewrite ``model`` in place (see the module's docstring) where at least ``min_siblings`` projections read one
    activation; returns how many groups became one ``MatMul``. A graph older than opset 13 (``Split`` with its sizes
    as an attribute) is left as it is."""
    if _opset(model) < 13:
        return 0
    graph = model.graph
    dims = initializer_dims(graph)
    types = {t.name: t.data_type for t in graph.initializer}
    removed: set[int] = set()
    extra: list[tuple[int, list[onnx.NodeProto]]] = []  # (id of the first sibling, the nodes placed before it)
    packed = 0
    # held while ids are compared: a node's wrapper lives as long as a reference to it
    groups = _siblings(graph, dims, types)
    for activation, group in groups.items():
        group = _packable(group, dims, types)
        if len(group) < min_siblings:
            continue
        with_bias = all(s.bias is not None for s in group)
        name = f"{group[0].matmul.name or activation}/packed"
        nodes = [helper.make_node("Concat", [s.matmul.input[1] for s in group], [f"{name}_weight"],
                                  name=f"{name}_weight", axis=1),
                 helper.make_node("MatMul", [activation, f"{name}_weight"], [f"{name}_out"], name=name)]
        wide = f"{name}_out"
        if with_bias:
            nodes += [helper.make_node("Concat", [s.bias_name for s in group], [f"{name}_bias"],
                                       name=f"{name}_bias", axis=0),
                      helper.make_node("Add", [wide, f"{name}_bias"], [f"{name}_biased"], name=f"{name}_add")]
            wide = f"{name}_biased"
        widths = f"{name}_widths"
        graph.initializer.append(helper.make_tensor(widths, onnx.TensorProto.INT64, [len(group)],
                                                    [s.width for s in group]))
        nodes.append(helper.make_node("Split", [wide, widths],
                                      [s.output if with_bias else s.matmul.output[0] for s in group],
                                      name=f"{name}_split", axis=-1))
        extra.append((id(group[0].matmul), nodes))
        for sibling in group:
            removed.add(id(sibling.matmul))
            if with_bias:
                removed.add(id(sibling.bias))
        packed += 1
    if not packed:
        return 0
    # the packed nodes take the first sibling's place: the activation exists there, and every reader of a sibling
    # (or of its bias add) comes after that sibling
    before = dict(extra)
    ordered = [new for node in graph.node for new in (before.get(id(node), []) + ([] if id(node) in removed
                                                                                   else [node]))]
    del graph.node[:]
    graph.node.extend(ordered)
    return packed
