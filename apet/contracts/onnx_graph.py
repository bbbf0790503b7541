"""Reading exported ONNX graphs without loading their weights or importing torch: graph I/O as TensorSpecs,
node counts per stage, external-data files, weight bytes, the checker. ``apet inspect``, the engine builder and
the exporter all ask these questions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import onnx
from onnx import numpy_helper

from apet.contracts.specs import TensorSpec
from apet.errors import ArtifactError

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.INT4: "int4",
}


def external_data_files(path: Path) -> list[str]:
    """Relative names of the external-data files an ONNX model refers to (no weights loaded)."""
    return external_locations(onnx.load(str(path), load_external_data=False))


def external_locations(model: onnx.ModelProto) -> list[str]:
    """Relative names of the external-data files a model proto's initializers refer to."""
    names: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(names)


def initializer_bytes(path: Path) -> int:
    """Bytes of the graph's weights as stored (INT4 packed), read from the protobuf without loading them."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
        else:
            total += len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes
    return total


def check_onnx(path: Path) -> None:
    """``onnx.checker`` with full shape inference; raises ArtifactError naming the file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several unrelated types
        raise ArtifactError(f"{Path(path).name} fails onnx.checker: {exc}",
                            "re-export it; if it persists, report the model and opset") from exc


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph as TensorSpecs (reads only the graph, not the weights)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tensor_type.shape.dim)
        return TensorSpec(value.name, dims, _ONNX_DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type)))

    inputs = [spec(v) for v in graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in graph.output]


def nodes_by_stage(path: Path) -> dict[str, int]:
    """Node count per stage of the exported graph (``vision``, ``apet_stage1``, ``llm layers``, ...), from the
    name scopes of :mod:`apet.scopes` (a node outside every scope counts as ``other``)."""
    from apet import scopes

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        found = scopes.scopes_in(node.name)
        stage = scopes.stage_of(found[0]) if found else "other"
        counts[stage] = counts.get(stage, 0) + 1
    return counts


def op_histogram(path: Path) -> dict[str, int]:
    """How many nodes of each op type the graph holds (for tests and reports)."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def spec_dict(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [s.to_json() for s in specs]
