"""Shape-derived values that a CUDA kernel reads as data, given to it on the device without a host-to-device copy, so
ONNX Runtime can capture the session as CUDA graphs (:mod:`.ort_prompt_graphs`).

ONNX Runtime's CUDA execution provider puts shape arithmetic on the CPU: a consumer of a CPU tensor (``Shape``'s
output) whose every input is a CPU tensor, a small initializer or a graph input, and so on downstream
(``GetCpuPreferredNodes``, onnxruntime/core/framework/fallback_cpu_capability.cc). Only CPU outputs start that
search: a node that reads graph inputs and constants alone stays on the device, also where the caller binds the
input on the host (placement comes before binding). Where a CUDA kernel then reads
such a value as data, not as one of its host inputs, ONNX Runtime inserts a ``MemcpyFromHost``, and a session with a
copy node cannot use CUDA graphs. ApET's stage 2 does this in the prefill: it clamps the image span to the prompt's
length and builds its index ranges from it.

First, ``ConstantOfShape(Shape(t))`` of a statically shaped ``t`` becomes the constant it is (the torch exporter's
``expand(..., -1)`` pattern: ONNX Runtime runs ``ConstantOfShape`` on the device, so the shape arithmetic after it
would be copied back to ``Expand``'s host input). Then the rewrite gives each value (an integer tensor of at most
:data:`MAX_ELEMENTS` elements) a device twin computed from host inputs the kernels are built to read: per element
``e``, ``Range(e, e + 1, 1)`` — CUDA's ``Range`` reads its three inputs on the host and writes ``[e]`` on the
device, so ONNX Runtime keeps it there (a kernel's own host inputs never pull a node onto the CPU), while ``e + 1``
is host arithmetic. Exact for |e| < 2^53 (ONNX Runtime counts ``Range``'s elements in double); one tiny kernel per
element inside the captured graph (the ones summed by ``ConstantOfShape`` before took six, and held only
|e| < 2^24). :func:`host_reads` models ONNX Runtime's placement to find them (the tests check it; the GPU run checks
ORT).
"""

from __future__ import annotations

import heapq

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from apet.runtime.backends.ort_graph_edit import ONNX_DOMAINS, producer_map

MAX_ELEMENTS = 4  # larger shape-derived tensors read as data are left alone (none in the exported graphs)
SMALL_INITIALIZER = 100  # ONNX Runtime's kSmallInitializerThreshold (elements)
CPU_OUTPUTS = {"Shape": (0,), "Size": (0,)}  # CUDA kernels whose output lives on the host
# the inputs CUDA kernels read on the host (their kernel definitions' OrtMemTypeCPUInput)
CPU_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Range": (0, 1, 2), "TopK": (1,), "Tile": (1,),
    "ConstantOfShape": (0,), "Unsqueeze": (1,), "Squeeze": (1,), "ReduceSum": (1,), "ReduceMean": (1,),
    "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceSumSquare": (1,), "Clip": (1, 2),
    "Pad": (1, 2, 3), "Split": (1,), "CumSum": (1,), "Resize": (1, 2, 3), "Trilu": (1,), "OneHot": (1,),
    "GroupQueryAttention": (6,),
}
_HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_INTEGER = (TensorProto.INT64, TensorProto.INT32)
_NUMPY = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32}
_ONE = {kind: f"device_shapes/one{np.dtype(_NUMPY[kind]).itemsize * 8}" for kind in _INTEGER}  # Range's step, +1


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.value_info, *graph.input, *graph.output)}


def _elem(types: dict[str, onnx.TypeProto], name: str) -> int | None:
    kind = types.get(name)
    return kind.tensor_type.elem_type if kind is not None and kind.HasField("tensor_type") else None


def _static_size(types: dict[str, onnx.TypeProto], name: str) -> int | None:
    kind = types.get(name)
    if kind is None or not kind.tensor_type.HasField("shape"):
        return None
    size = 1
    for dim in kind.tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            return None
        size *= dim.dim_value
    return size


def host_reads(model: onnx.ModelProto, host_inputs: frozenset[str] = frozenset(),
               types: dict[str, onnx.TypeProto] | None = None) -> list[tuple[int, int]]:
    """(node index, input index) of every input a CUDA kernel reads as data from a tensor ONNX Runtime computes on
    the CPU (where it would insert a copy) or from a graph input bound on the host (``host_inputs``: copied at each
    run), and of every device input a node placed on the CPU reads (copied to the host before the run)."""
    graph = model.graph
    types = _types(model) if types is None else types
    cpu_nodes, cpu_tensors, small = _placement(model, types)
    inputs = {i.name for i in graph.input}
    reads = []
    for index, node in enumerate(graph.node):
        if index in cpu_nodes:  # a device input read on the host: ONNX Runtime copies it before the run
            reads.extend((index, slot) for slot, name in enumerate(node.input)
                         if name in inputs and name not in host_inputs)
            continue
        if node.op_type in CPU_OUTPUTS or all(name in small for name in node.output):
            continue
        for slot, name in enumerate(node.input):
            host_slot = slot in CPU_INPUTS.get(node.op_type, ())
            if (name in cpu_tensors or name in host_inputs) and not host_slot:
                reads.append((index, slot))  # a host value read as data: MemcpyFromHost
            elif host_slot and name and name not in cpu_tensors and name not in small and name not in inputs:
                reads.append((index, slot))  # a device value read on the host: MemcpyToHost
    return reads


def placed_on_cpu(model: onnx.ModelProto) -> set[int]:
    """Indices of the nodes ONNX Runtime's CUDA provider would leave to the CPU (shape arithmetic), by its rule."""
    return _placement(model, _types(model))[0]


def _placement(model: onnx.ModelProto, types: dict[str, onnx.TypeProto]) -> tuple[set[int], set[str], set[str]]:
    """(nodes placed on the CPU, tensors that live on the host, small constants): ``GetCpuPreferredNodes`` as
    modelled here (a node whose inputs are all host values goes to the CPU, unless the device kernel reads one of
    them on the host anyway)."""
    graph = model.graph
    small = {t.name for t in graph.initializer if _numel(t) <= SMALL_INITIALIZER}
    small.update(node.output[0] for node in graph.node if node.op_type == "Constant")  # ORT loads them as such
    for node in graph.node:  # ONNX Runtime folds nodes of constants before it places nodes (small: shape values)
        if node.input and all(name in small for name in node.input if name):
            small.update(node.output)
    inputs = {i.name for i in graph.input}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    # ONNX Runtime places nodes before any input is bound: only CPU outputs start its search, and a graph input (bound
    # on the host or not) lets a node go to the CPU without sending it there
    cpu_tensors: set[str] = set()
    queue: list[int] = []
    for index, node in enumerate(graph.node):
        for slot in CPU_OUTPUTS.get(node.op_type, ()):
            cpu_tensors.add(node.output[slot])
            queue.extend(consumers.get(node.output[slot], []))
    heapq.heapify(queue)  # node order is topological: ONNX Runtime visits candidates in that order too
    visited: set[int] = set()
    cpu_nodes: set[int] = set()
    while queue:
        index = heapq.heappop(queue)
        if index in visited:
            continue
        visited.add(index)
        node = graph.node[index]
        if node.domain not in ONNX_DOMAINS and node.op_type not in CPU_INPUTS:
            continue  # contrib kernels stay on the device
        on_cpu = True
        for slot, name in enumerate(node.input):
            if not name:
                continue
            if _elem(types, name) in _HALF:
                on_cpu = False
            elif name in small or name in inputs:
                continue
            elif name not in cpu_tensors or slot in CPU_INPUTS.get(node.op_type, ()):
                on_cpu = False
            if not on_cpu:
                break
        if on_cpu:
            cpu_nodes.add(index)
            for name in node.output:
                cpu_tensors.add(name)
                for consumer in consumers.get(name, []):
                    heapq.heappush(queue, consumer)
    return cpu_nodes, cpu_tensors, small


def _numel(tensor: TensorProto) -> int:
    size = 1
    for dim in tensor.dims:
        size *= dim
    return size


def to_device(model: onnx.ModelProto, host_inputs: frozenset[str] = frozenset()) -> int:
    """Rewrite ``model`` in place (module docstring); returns how many host values now have a device twin. Values
    it cannot twin (not integer, unknown or larger size, or a graph input bound on the host: the twin's host
    arithmetic would stay on the device, ONNX Runtime places before inputs are bound) are left as they are (ONNX
    Runtime then copies them)."""
    graph = model.graph
    types = _types(model)
    inputs = {i.name for i in graph.input}
    _fold_static_fills(graph, types)
    reads = host_reads(model, host_inputs, types)
    twins: dict[str, str] = {}
    inserted: dict[int, list[onnx.NodeProto]] = {}
    constants = {"device_shapes/flat": np.array([-1], np.int64),
                 **{_ONE[kind]: np.array(1, _NUMPY[kind]) for kind in _INTEGER},
                 **{_index(k): np.array(k, np.int64) for k in range(MAX_ELEMENTS)}}
    for index, slot in reads:
        node = graph.node[index]
        name = node.input[slot]
        kind, size = _elem(types, name), _static_size(types, name)
        if slot in CPU_INPUTS.get(node.op_type, ()) or name in inputs or kind not in _INTEGER or size is None \
                or size > MAX_ELEMENTS:  # a device value read on the host, or a graph input: no twin helps
            continue
        if name not in twins:
            twins[name], nodes = _twin(name, kind, size, types)
            inserted.setdefault(index, []).extend(nodes)
        node.input[slot] = twins[name]
    if not twins:
        return 0
    ordered = [new for i, node in enumerate(graph.node) for new in (*inserted.get(i, []), node)]
    del graph.node[:]
    graph.node.extend(ordered)
    used = {name for nodes in inserted.values() for node in nodes for name in node.input}  # no unused initializer:
    # ONNX Runtime warns of each one when a session is made
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items() if k in used)
    return len(twins)


def _fold_static_fills(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> None:
    """``ConstantOfShape(Shape(t))`` of a ``t`` whose shape is static -> that constant (an initializer). The torch
    exporter writes it for ``expand(..., -1, ...)``; ONNX Runtime runs ``ConstantOfShape`` on the device, so the
    shape arithmetic it feeds (``Equal``, ``Where``) would run there and be copied back to ``Expand``'s host input."""
    producers = producer_map(graph)
    folded = []
    for node in graph.node:
        shape_node = producers.get(node.input[0]) if node.op_type == "ConstantOfShape" else None
        if shape_node is None or shape_node.op_type != "Shape" or shape_node.attribute:
            continue
        source = types.get(shape_node.input[0])
        size = _static_size(types, shape_node.input[0])
        if source is None or size is None:
            continue
        dims = [d.dim_value for d in source.tensor_type.shape.dim]
        value = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "value"), None)
        fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
        folded.append((node, numpy_helper.from_array(np.full(dims, fill, dtype=fill.dtype), node.output[0])))
    for node, constant in folded:
        graph.node.remove(node)
        graph.initializer.append(constant)


def _index(k: int) -> str:
    return f"device_shapes/index{k}"


def _twin(name: str, kind: int, size: int, types: dict[str, onnx.TypeProto]) -> tuple[str, list[onnx.NodeProto]]:
    """Nodes computing ``name``'s values on the device from host values only; its shape as ``name``'s. Per element
    ``e`` (a host scalar: ``Gather`` of the flattened value), ``Range(e, e + 1, 1)`` on the device."""
    prefix = f"{name}/device"
    nodes = [helper.make_node("Reshape", [name, "device_shapes/flat"], [f"{prefix}/flat"])]
    parts = []
    for k in range(size):
        element = f"{prefix}/{k}"
        nodes += [helper.make_node("Gather", [f"{prefix}/flat", _index(k)], [element], axis=0),  # host, 0-D
                  helper.make_node("Add", [element, _ONE[kind]], [f"{element}/end"]),  # host
                  helper.make_node("Range", [element, f"{element}/end", _ONE[kind]], [f"{element}/value"])]
        parts.append(f"{element}/value")
    joined = parts[0]
    if len(parts) > 1:
        joined = f"{prefix}/joined"
        nodes.append(helper.make_node("Concat", parts, [joined], axis=0))
    shape = [d.dim_value for d in types[name].tensor_type.shape.dim]
    shape_name = f"{prefix}/shape"
    nodes.append(helper.make_node("Constant", [], [shape_name],
                                  value=helper.make_tensor(shape_name, TensorProto.INT64, [len(shape)], shape)))
    nodes.append(helper.make_node("Reshape", [joined, shape_name], [f"{prefix}/value"]))
    return f"{prefix}/value", nodes
