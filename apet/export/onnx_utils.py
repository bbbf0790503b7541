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

from apet.errors import ArtifactError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's ceiling; higher opsets go through the version converter
PENDING_DOMAIN = "apet.pending"  # ops of a newer opset, written by the tracer, moved to ai.onnx after conversion
PROTOBUF_LIMIT = 2**31 - 1024 * 1024  # stay clear of protobuf's 2 GiB hard limit



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
