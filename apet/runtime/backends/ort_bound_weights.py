"""The static form's LLM weights held once for its two ONNX Runtime sessions (the optional rewrite ``share-weights``):
each large weight becomes an input of the rewritten graphs, bound to one OrtValue on the session's device that the
prefill session and the decode session both read.

Why: each ONNX Runtime session loads its own copy of its graph's initializers, and the static form runs two graphs
over the same weights (the prefill with ApET's stage 2, and the decode step): 2 × 13.2 GB at LLaVA-1.5-7B shapes in
fp16, a second copy a 16 GB Jetson cannot hold for a 3B model. ONNX Runtime shares initializers between sessions
only through ``SessionOptions.add_initializer``, and it then leaves them out of constant folding, so the packed
projections (a ``Concat`` of initializers, :mod:`.ort_pack`) would be concatenated at every run. Bound inputs have
neither problem: the packed weights are concatenated here, once, and every run (a CUDA graph's too: the addresses
never change) reads the same buffers.

What is lifted: every initializer of at least :data:`MIN_BYTES` (smaller constants stay in each graph), and every
``Concat`` whose inputs are all such initializers (a packed weight), as one input of the concatenation. A weight is
known by where its bytes lie (file, offset, length: the decode graph of an artifact exported with shared weights,
:mod:`apet.export.shared_weights`, points into the prefill's file) or, stored inside the graph, by its bytes
(sha256); one key, one buffer. The values are the artifact's bytes as they are: the graphs compute what they
computed (a kernel may take another path for an input than for a constant, so float roundings can differ).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from apet.runtime.backends.ort_graph_edit import consumer_map

log = logging.getLogger(__name__)
MIN_BYTES = 1 << 20  # weights of at least 1 MiB are bound (a 7B layer's smallest projection is 32 MiB)
LIFTED_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32,
                          onnx.TensorProto.INT64})  # numpy's own types (bfloat16 weights stay initializers)
Key = tuple


class BoundWeights:
    """The weights of one artifact's graphs, each loaded and placed on the device once, by key."""

    def __init__(self, ort: Any, device_type: str, directory: Path) -> None:
        self.ort, self.device_type, self.directory = ort, device_type, Path(directory)
        self.values: dict[Key, Any] = {}  # key -> OrtValue
        self.bytes = 0

    def lift(self, model: onnx.ModelProto) -> dict[str, Any]:
        """Rewrite ``model`` in place (module docstring) -> {input name: OrtValue} to bind at every run."""
        graph = model.graph
        initializers = {t.name: t for t in graph.initializer}
        large = {name for name, tensor in initializers.items()
                 if tensor.data_type in LIFTED_TYPES and _nbytes(tensor) >= MIN_BYTES}
        bound: dict[str, Any] = {}
        lifted: list[onnx.NodeProto] = []
        for node in graph.node:
            if node.op_type == "Concat" and node.input and all(name in large for name in node.input):
                axis = int(next(a.i for a in node.attribute if a.name == "axis"))
                parts = [initializers[name] for name in node.input]
                bound[node.output[0]] = self._value(("concat", axis, *(self._key(t) for t in parts)),
                                                    lambda parts=parts, axis=axis: np.concatenate(
                                                        [self._array(t) for t in parts], axis=axis))
                graph.input.append(helper.make_tensor_value_info(
                    node.output[0], parts[0].data_type, _concat_dims(parts, axis)))
                lifted.append(node)
        for node in lifted:
            graph.node.remove(node)
        consumers = consumer_map(graph)
        for name in sorted(large):
            if consumers.get(name):  # else read only by a lifted Concat
                tensor = initializers[name]
                bound[name] = self._value(self._key(tensor), lambda tensor=tensor: self._array(tensor))
                graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        kept = [tensor for tensor in graph.initializer if tensor.name not in large]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        log.info("%s: %d weights bound as inputs (%d held for all graphs, %.1f MB)", graph.name or "graph",
                 len(bound), len(self.values), self.bytes / 1e6)
        return bound

    def _value(self, key: Key, array: Any) -> Any:
        if key not in self.values:
            values = array()
            self.values[key] = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(values),
                                                                      self.device_type, 0)
            self.bytes += values.nbytes
        return self.values[key]

    def _key(self, tensor: onnx.TensorProto) -> Key:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            location = (self.directory / info.location).resolve()
            return ("file", str(location), int(info.offset or 0), int(info.length or 0), tuple(tensor.dims),
                    tensor.data_type)
        return ("bytes", hashlib.sha256(tensor.raw_data or numpy_helper.to_array(tensor).tobytes()).hexdigest(),
                tuple(tensor.dims), tensor.data_type)

    def _array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values (external bytes read where they lie)."""
        return numpy_helper.to_array(tensor, base_dir=str(self.directory))


def _nbytes(tensor: onnx.TensorProto) -> int:
    if uses_external_data(tensor):
        length = ExternalDataInfo(tensor).length
        if length:
            return int(length)
    return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _concat_dims(parts: list[onnx.TensorProto], axis: int) -> list[int]:
    dims = list(parts[0].dims)
    axis = axis % len(dims)
    dims[axis] = sum(int(t.dims[axis]) for t in parts)
    return dims
