"""The LLM's weights in ``[out, in]`` for ONNX Runtime's GEMMs: each ``MatMul(x, W)`` over a constant ``W [in, out]``
becomes ``FusedMatMul(x, Wᵀ, transB=1)`` (com.microsoft) over the transposed copy, in memory, when a rewritten graph's
session is created.

Why: ONNX Runtime calls cuBLAS with the weight as stored. Over ``[in, out]`` it runs the decode step's one-row
products as split-K GEMMs plus a reduce (4.03 ms a step at LLaVA-1.5-7B shapes, ~3.2 TB/s), where the torch path's
``[out, in]`` weights (``F.linear``: the same cuBLAS call with the weight transposed) get GEMV kernels (~3.4 ms,
docs/benchmarks.md, "GroupQueryAttention decode and a CUDA-graph vision session"). The artifact keeps ``[in, out]``:
TensorRT and the weight-only quantization (``DequantizeLinear`` → ``MatMul``) expect it, and ``FusedMatMul`` is a
contrib op TensorRT does not parse.

The copies are handed to ONNX Runtime as external initializers (``add_external_initializers``): the rewritten graph
names each one with a placeholder whose location is no file, so a copy that is not handed over fails the session
instead of reading the untransposed bytes. They live as long as the sessions that use them (ONNX Runtime may
read them in place), in host memory: as much again as the weights the graphs read (the prefill and decode graphs of
a static export store their weights apart, so two copies at 7B shapes: 2 × 13 GB of host memory on the GPU machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

CONTRIB_DOMAIN = "com.microsoft"
SUFFIX = "/out_in"  # the transposed copy's initializer name: the weight's name + this
IN_MEMORY = "apet-transposed-in-memory"  # the placeholders' location: never a file (a missed hand-over fails)
_NUMPY = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}


@dataclass
class TransposedWeights:
    """Transposed copies, each made once per stored weight (file, offset, length): the graphs of one artifact that
    read the same bytes share a copy. Names are each graph's own, so copies are not found by name."""

    weights_dir: Path
    arrays: dict[tuple, np.ndarray] = field(default_factory=dict)

    def of(self, tensor: TensorProto) -> np.ndarray:
        if not uses_external_data(tensor):  # inline: the graph's own bytes
            return np.ascontiguousarray(numpy_helper.to_array(tensor).T)
        entries = {entry.key: entry.value for entry in tensor.external_data}
        where = (entries["location"], int(entries.get("offset", 0)), tuple(tensor.dims), tensor.data_type)
        if where not in self.arrays:
            self.arrays[where] = np.ascontiguousarray(_mapped(tensor, self.weights_dir, entries).T)
        return self.arrays[where]


def transpose_matmul_weights(model: onnx.ModelProto, weights: TransposedWeights) -> dict[str, np.ndarray]:
    """Rewrite ``model`` in place (module docstring); returns the copies its session must be given, by name (their
    host OrtValues: ``OrtValue.ortvalue_from_numpy``, which wraps the array without copying it)."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    copies: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or weight.data_type not in _NUMPY:
            continue
        name = weight.name + SUFFIX
        if name not in copies:
            copies[name] = weights.of(weight)
            graph.initializer.append(_placeholder(name, copies[name], weight.data_type))
        node.op_type, node.domain = "FusedMatMul", CONTRIB_DOMAIN
        node.input[1] = name
        node.attribute.append(helper.make_attribute("transB", 1))
    still_read = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if copies and not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return copies


def _placeholder(name: str, array: np.ndarray, data_type: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=data_type, dims=list(array.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", IN_MEMORY), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _mapped(tensor: TensorProto, weights_dir: Path, entries: dict[str, str]) -> np.ndarray:
    """The external tensor's values, mapped from its file (not read whole into a second buffer)."""
    kind = np.dtype(_NUMPY[tensor.data_type])
    count = int(np.prod(tensor.dims))
    return np.memmap(weights_dir / entries["location"], dtype=kind, mode="r", offset=int(entries.get("offset", 0)),
                     shape=(count,)).reshape(tuple(tensor.dims))
