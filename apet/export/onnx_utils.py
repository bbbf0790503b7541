"""ONNX plumbing shared by every exported graph: export, external data, checks, I/O description."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import onnx
import torch
from onnx import numpy_helper

from apet.contracts.specs import TensorSpec
from apet.errors import ArtifactError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's ceiling; higher opsets go through the version converter
PENDING_DOMAIN = "apet.pending"  # ops of a newer opset, written by the tracer, moved to ai.onnx after conversion
PROTOBUF_LIMIT = 2**31 - 1024 * 1024  # stay clear of protobuf's 2 GiB hard limit

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


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the tracer's warnings about static shapes: ours are static on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        yield


def export_onnx(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Trace ``module`` with the TorchScript exporter, optimise the graph and save ``path`` at ``opset``;
    weights go to ``path.data`` (one file) when the model does not fit one protobuf.

    The TorchScript exporter is used because it keeps static Python ints static
    (k, K, head counts), produces plain ops TensorRT 10.3 parses, and needs no
    ``torch.export``-compatible model code. It writes at most opset 20: above that the
    graph is traced at 20 and raised by onnxscript's version converter.
    """
    path = Path(path)
    traced_opset = min(opset, TORCHSCRIPT_MAX_OPSET)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        raw = Path(scratch) / path.name
        with quiet_tracing(), torch.no_grad():
            example_outputs = module(*args)
            torch.onnx.export(
                module, args, str(raw), input_names=list(input_names), output_names=list(output_names),
                dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, opset_version=traced_opset,
                do_constant_folding=True, dynamo=False,
            )
        _declare_output_shapes(raw, output_names, example_outputs, dynamic_axes)
        _optimize_and_save(raw, path, opset)
    return path


def _declare_output_shapes(path: Path, names: Sequence[str], examples: Any,
                           dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Write static output dims (budgets K, hidden sizes) into the graph where inference lost them.

    Shape inference cannot see through TopK/GatherElements chains, so without
    this the K of ``visual_embeds`` would read as a symbol in the manifest and
    in TensorRT's binding shapes.
    """
    examples = examples if isinstance(examples, (tuple, list)) else (examples,)
    model = onnx.load(str(path), load_external_data=False)
    for output, example in zip(model.graph.output, examples):
        dynamic = dynamic_axes.get(output.name, {})
        dims = output.type.tensor_type.shape.dim
        if len(dims) != example.dim():
            continue
        for i, dim in enumerate(dims):
            if i in dynamic:
                dim.dim_param = dynamic[i]
            else:
                dim.dim_value = int(example.shape[i])
    # rewrites the protobuf only; external weight files (large models) stay untouched
    Path(path).write_bytes(model.SerializeToString())


def _raise_opset(model: Any, opset: int) -> None:
    """Convert an IR model to ``opset`` with onnxscript's version converter (per-op adapters where an op's
    semantics changed, e.g. GroupNormalization at 21; the ops apet's graphs use only gained types between 20
    and 23), then move the ops traced into :data:`PENDING_DOMAIN` to the standard domain, where they now exist."""
    from onnxscript import version_converter

    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if current is not None and current < opset:
        version_converter.convert_version(model, opset, fallback=False)
        reached = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if reached != opset:
            raise ArtifactError(f"onnxscript's version converter left the graph at opset {reached}, not {opset}",
                                "export with the target's default opset (drop --opset) and report the model")
    pending = [n for n in model.graph.all_nodes() if n.domain == PENDING_DOMAIN]
    for node in pending:
        node.domain = ""
    model.opset_imports.pop(PENDING_DOMAIN, None)
    if pending:
        log.info("moved %d %s nodes to ai.onnx opset %d", len(pending), PENDING_DOMAIN, opset)


def _optimize_and_save(raw: Path, final: Path, opset: int = DEFAULT_OPSET) -> None:
    """Fold constants and drop dead or no-op nodes with the onnxscript optimizer, then write ``final``.

    The TorchScript exporter leaves every shape computation and literal as its own node (about half
    of a raw graph is ``Constant``); on Jetson each unfused node can cost a kernel launch. Folding is
    size-limited, so no weight is materialised twice. The ONNX IR keeps weights as lazy external
    tensors and streams them out, so a 7B graph is rewritten without holding its weights in one
    protobuf: a model that does not fit one protobuf goes to ``<name>.data`` (one file); a small one
    stays a single file. ``raw``'s directory holds nothing but the model and its external data.
    Quantized weights are lowered to ``DequantizeLinear`` after optimizing, so folding never sees them.
    """
    import onnx_ir as ir
    from onnxscript import optimizer

    from apet.export.qdq import lower_weight_dq

    model = ir.load(str(raw))
    optimizer.optimize(model, num_iterations=2)
    _raise_opset(model, opset)  # before lowering: the converter must not meet INT4 tensors
    lowered = lower_weight_dq(model, opset)
    if lowered:
        log.info("%s: %d weight-only quantized projections", final.name, lowered)
    weights = sum(p.stat().st_size for p in raw.parent.iterdir())
    if weights < PROTOBUF_LIMIT:
        ir.save(model, str(final))
        return
    data_name = final.name + ".data"
    (final.parent / data_name).unlink(missing_ok=True)
    ir.save(model, str(final), external_data=data_name)
    log.info("saved %s with external data %s", final.name, data_name)


def external_data_files(path: Path) -> list[str]:
    """Relative names of the external-data files an ONNX model refers to (no weights loaded)."""
    model = onnx.load(str(path), load_external_data=False)
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
