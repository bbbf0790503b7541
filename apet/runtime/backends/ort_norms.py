"""The decoder's residual sums and the RMSNorm after each, as one ``SkipSimplifiedLayerNormalization``
(com.microsoft) per pair, in the LLM graphs that :mod:`.ort_gqa` rewrote in memory.

Why: replayed as a CUDA graph, a decode step spends about 1 µs between any two of its ~790 nodes beyond their work
(docs/benchmarks.md, ``h200-vision/``), and ONNX Runtime fuses each RMSNorm into one node but leaves the residual
``Add`` before it alone (its optimizer has no skip fusion for the simplified norm; checked on the CPU's optimized
graph). One node per pair removes two kernels per layer, and a pass over the hidden state. ONNX Runtime's own
fusion tool (``onnxruntime.transformers``) matches only the float32 pattern, so this matches the export's float16
one too: ``x = a + b``, ``Cast(x)`` to float32 where the model upcasts, ``x² → mean → + ε → √ → 1/· → x·``, the cast
back, ``· × weight``.

The sum is formed once in the kernel rather than rounded to float16 before the norm reads it: values within float16
rounding, not bit-identical. The optional rewrite ``fuse-norms`` (:data:`.ort_options.GRAPH_REWRITES`), on by default:
0.3 ms less per decode step at LLaVA-1.5-7B shapes on the H200, ApET's indices unchanged (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from apet.runtime.backends.ort_graph_edit import (
    CONTRIB_DOMAIN,
    constant_values,
    consumer_map,
    initializer_dims,
    producer_map,
    replace_nodes,
    use_contrib_domain,
)


def _scalar(constants: dict[str, np.ndarray], name: str) -> float | None:
    value = constants.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


class _Match:
    """One RMSNorm of a residual sum, found from its weight ``Mul`` back to the sum."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producers, self.consumers = producer_map(graph), consumer_map(graph)
        self.constants = constant_values(graph)
        self.initializers = initializer_dims(graph)

    def _parent(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type else None

    def _only_read_by(self, node: onnx.NodeProto, readers: int = 1) -> bool:
        return len(self.consumers.get(node.output[0], [])) == readers

    def __call__(self, scale: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str, str, str, float] | None:
        """``scale`` -> (the nodes the fused one replaces, a, b, weight, ε), or None where the chain differs."""
        weights = [name for name in scale.input if len(self.initializers.get(name, ())) == 1]
        if scale.op_type != "Mul" or len(weights) != 1:
            return None
        normed = next(name for name in scale.input if name != weights[0])
        chain: list[onnx.NodeProto] = []
        down = self._parent(normed, "Cast")  # back to the model's dtype after a float32 norm
        if down is not None:
            chain.append(down)
            normed = down.input[0]
        times = self._parent(normed, "Mul")
        if times is None:
            return None
        chain.append(times)
        found = None
        for side in (0, 1):
            inverse = self.producers.get(times.input[side])
            if inverse is not None and inverse.op_type == "Div" and _scalar(self.constants, inverse.input[0]) == 1.0:
                found = (times.input[1 - side], inverse, inverse.input[1])
            elif inverse is not None and inverse.op_type == "Reciprocal":
                found = (times.input[1 - side], inverse, inverse.input[0])
        if found is None:
            return None
        upcast, inverse, root = found
        root_node = self._parent(root, "Sqrt")
        shifted = self._parent(root_node.input[0], "Add") if root_node is not None else None
        if shifted is None:
            return None
        epsilon = next((_scalar(self.constants, name) for name in shifted.input if name in self.constants), None)
        mean = next((self.producers.get(name) for name in shifted.input if name not in self.constants), None)
        if epsilon is None or mean is None or mean.op_type != "ReduceMean":
            return None
        square = self.producers.get(mean.input[0])
        if square is None or not (
                (square.op_type == "Pow" and _scalar(self.constants, square.input[1]) == 2.0
                 and square.input[0] == upcast)
                or (square.op_type == "Mul" and list(square.input) == [upcast, upcast])):
            return None
        axes = [helper.get_attribute_value(a) for a in mean.attribute if a.name == "axes"] or \
            ([self.constants[mean.input[1]].tolist()] if len(mean.input) > 1 and mean.input[1] in self.constants
             else [])
        keepdims = next((helper.get_attribute_value(a) for a in mean.attribute if a.name == "keepdims"), 1)
        if not axes or list(np.ravel(axes[0])) != [-1] or keepdims != 1:
            return None
        chain += [inverse, root_node, shifted, mean, square]
        summed = upcast
        cast_up = self._parent(upcast, "Cast")
        if cast_up is not None:
            chain.append(cast_up)
            summed = cast_up.input[0]
        residual = self._parent(summed, "Add")
        if residual is None or any(name in self.constants or name in self.initializers for name in residual.input):
            return None
        # every node of the norm feeds only the next one; the upcast sum feeds the square and the product
        if not all(self._only_read_by(node) for node in chain if node is not cast_up):
            return None
        if cast_up is not None and not self._only_read_by(cast_up, 2):
            return None
        return chain + [residual], residual.input[0], residual.input[1], weights[0], epsilon


def fuse_residual_norms(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place (see the module's docstring); returns how many pairs became one node."""
    graph = model.graph
    match = _Match(graph)
    replaced: dict[int, onnx.NodeProto] = {}
    removed: set[int] = set()
    for node in graph.node:
        found = match(node) if node.op_type == "Mul" else None
        if found is None or any(id(n) in removed for n in found[0]):
            continue
        nodes, first, second, weight, epsilon = found
        residual, norm = nodes[-1], {id(n) for n in nodes}
        readers = [n for n in match.consumers.get(residual.output[0], []) if id(n) not in norm]
        outputs = [node.output[0], "", "", residual.output[0] if readers else ""]
        replaced[id(residual)] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [first, second, weight], outputs,
            name=f"{node.name}/skip_norm", domain=CONTRIB_DOMAIN, epsilon=epsilon)
        removed.update(id(n) for n in nodes[:-1])
        removed.add(id(node))
    if not replaced:
        return 0
    # the fused node takes the residual Add's place: its inputs exist there, and the sum's readers come after it
    replace_nodes(graph, replaced, removed)
    use_contrib_domain(model)
    return len(replaced)
