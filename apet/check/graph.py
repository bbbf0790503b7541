"""What of an exported graph the check marks and reads: each scope's boundary tensors (the stage outputs), the
scope of every tensor in node order (to name where a departure starts), and the reduced ONNX of one scope."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from apet import scopes

STAGE_ORDER_HINT = (scopes.VISION, scopes.APET_STAGE1, scopes.PROJECTOR)


def is_stage(scope: str) -> bool:
    """The scopes the report has a row for: vision, ApET stages, projector, decoder layers, final norm."""
    base = scopes.base_scope(scope)
    return base in (scopes.VISION, scopes.APET_STAGE1, scopes.PROJECTOR, scopes.APET_STAGE2, "norm") or \
        scopes.stage_of(base) == "llm layers"


def scope_of_tensor(name: str) -> str | None:
    found = scopes.scopes_in(name)
    return found[0] if found else None


@dataclass
class GraphScopes:
    """One graph's scopes: the boundary tensors each stage scope hands on, every node output in order."""

    boundaries: dict[str, list[str]] = field(default_factory=dict)  # stage scope -> its outputs, in node order
    tensor_order: list[str] = field(default_factory=list)  # node outputs in the graph's (topological) order
    tensor_scope: dict[str, str | None] = field(default_factory=dict)


def graph_scopes(model: onnx.ModelProto) -> GraphScopes:
    graph = model.graph
    outputs = {o.name for o in graph.output}
    producer: dict[str, str | None] = {}
    result = GraphScopes()
    for node in graph.node:
        scope = scope_of_tensor(node.name)
        for out in node.output:
            if out:
                producer[out] = scope
                result.tensor_order.append(out)
                result.tensor_scope[out] = scope
    crossing = set(outputs)
    for node in graph.node:
        scope = scope_of_tensor(node.name)
        crossing.update(i for i in node.input if i in producer and producer[i] != scope)
    for tensor in result.tensor_order:
        scope = producer[tensor]
        if scope is not None and is_stage(scope) and tensor in crossing:
            result.boundaries.setdefault(scope, []).append(tensor)
    return result


def scope_io(model: onnx.ModelProto, scope: str) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of ``scope``'s nodes as a graph of their own: what they read from outside the scope (not
    initializers), and what they hand on (its boundary tensors; the last node's output where none leaves)."""
    inner = [n for n in model.graph.node if scope_of_tensor(n.name) == scope]
    if not inner:
        raise ValueError(f"the graph has no node in scope {scope!r}")
    produced = {o for n in inner for o in n.output}
    initializers = {i.name for i in model.graph.initializer}
    inputs = list(dict.fromkeys(i for n in inner for i in n.input
                                if i and i not in produced and i not in initializers))
    outputs = graph_scopes(model).boundaries.get(scope) or [inner[-1].output[0]]
    return inputs, outputs


def extract_scope(model_path: Path, scope: str, out: Path) -> Path:
    """The nodes of ``scope`` as a standalone ONNX model (inputs: what the scope reads from outside it;
    outputs: what it hands on), small enough to attach to a bug report."""
    inputs, outputs = scope_io(onnx.load(str(model_path)), scope)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.utils.extract_model(str(model_path), str(out), inputs, outputs, check_model=False)
    return out
