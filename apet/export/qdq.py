"""Lower the exporter's ``apet::WeightDQ`` placeholders to standard ONNX ``DequantizeLinear``.

The TorchScript exporter can neither emit INT4 tensors nor opset 21 (its maximum is 20), so a
quantized projection is traced as one opaque placeholder over its packed bytes and its scales
(see :mod:`apet.quant.qlinear`). Here, on the ONNX IR, each placeholder becomes

    DequantizeLinear(W: int4 [K, N], scale [K/G, N], axis=0, block_size=G)   (INT4, opset 21 blocked)
    DequantizeLinear(W: int8 [K, N], scale [N], axis=1)                      (INT8, per output channel)

feeding the MatMul it already fed, which is the weight-only pattern TensorRT fuses into one GEMM and
ONNX Runtime runs as is. The INT4 initializer reuses the packed bytes (ONNX packs INT4 two per byte,
low nibble first, row-major, as we do) through a lazy tensor, so a 7B graph is rewritten without
loading its weights; initializers are renamed after the module (``<module>.qweight``/``.scale``).
"""

from __future__ import annotations

import onnx_ir as ir

from apet.errors import ArtifactError
from apet.quant.qlinear import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP


def _attr(node: ir.Node, name: str):
    return node.attributes[name].value


def _int4_tensor(packed: ir.TensorProtocol, k: int, n: int, name: str) -> ir.LazyTensor:
    def load() -> ir.TensorProtocol:
        return ir.PackedTensor(packed.numpy().reshape(-1), ir.DataType.INT4, shape=[k, n])

    return ir.LazyTensor(load, ir.DataType.INT4, ir.Shape([k, n]), name=name)


def _lower(graph: ir.Graph, node: ir.Node) -> None:
    fmt, k, n = _attr(node, "format"), _attr(node, "k"), _attr(node, "n")
    module = _attr(node, "module") or node.name
    weight, scale = node.inputs
    if weight is None or scale is None or weight.const_value is None or scale.const_value is None:
        raise ArtifactError(f"quantized weight of {module} is not a constant in the traced graph",
                            "report this model; the exporter folded or computed the weight")
    if len(weight.uses()) != 1:
        raise ArtifactError(f"quantized weight of {module} is shared by several nodes", "report this model")
    q_name = f"{module}.qweight"
    if fmt == "int4":
        graph.initializers.pop(weight.name, None)  # the packed uint8 bytes become an INT4 [K, N] tensor
        q_value = ir.Value(name=q_name, shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.INT4),
                           const_value=_int4_tensor(weight.const_value, k, n, q_name))
        graph.register_initializer(q_value)
        attributes = [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", _attr(node, "block_size"))]
    else:
        q_value = weight  # already int8 [K, N]
        graph.initializers.pop(weight.name, None)
        weight.name = q_name
        graph.register_initializer(weight)
        attributes = [ir.AttrInt64("axis", 1)]
    scale.name = f"{module}.scale"
    dq = ir.Node("", "DequantizeLinear", [q_value, scale], attributes, name=f"{module}/DequantizeLinear")
    graph.insert_before(node, dq)
    dq.outputs[0].shape, dq.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    ir.convenience.replace_all_uses_with(node.outputs[0], dq.outputs[0])
    graph.remove(node, safe=True)


def lower_weight_dq(model: ir.Model, opset: int) -> int:
    """Replace every placeholder (in place), set the default-domain opset, drop the ``apet`` domain;
    returns how many weights were lowered."""
    placeholders = [n for n in model.graph if n.domain == PLACEHOLDER_DOMAIN and n.op_type == PLACEHOLDER_OP]
    for node in placeholders:
        _lower(model.graph, node)
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    if placeholders and model.opset_imports.get("", 0) < opset:
        model.opset_imports[""] = opset
    return len(placeholders)
