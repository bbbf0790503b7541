"""How many layers TensorRT sees per scope of a graph: after parsing (any machine, TensorRT-RTX parses on a CPU)
and, where a GPU ran the plan, after fusion (the engine inspector's layers).

On a Jetson every unfused engine layer can be a kernel launch, so these counts are what ApET costs an engine
before any timing. Parsed layers carry their ONNX node's name and, from TensorRT 10, the node in their
``metadata`` (``[ONNX Layer: /apet_stage1/TopK]``); the helper layers the parser adds for a node (shape
arithmetic, casts, constants: ``ONNXTRT_ShapeElementWise_12``) carry neither. The parser adds a node's
helpers while importing that node, before the layer that carries its name, so a helper is counted with the
next layer that names a node (a trailing helper with the last one); a node outside every scope is ``other``.
Engine layers name the nodes they fused; a layer fusing several scopes counts once, under the first.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from apet import scopes

OTHER = "other"  # nodes and layers outside every scope


def _stage(texts: Iterable[str]) -> str | None:
    for text in texts:
        found = scopes.scopes_in(text or "")
        if found:
            return scopes.stage_of(found[0])
    return None


def _add(counts: dict[str, int], stage: str, n: int = 1) -> None:
    counts[stage] = counts.get(stage, 0) + n


def parsed_layers_by_stage(network: Any) -> dict[str, int]:
    """Layers of a parsed ``INetworkDefinition`` per stage (``vision``, ``apet_stage1``, ``llm layers``, ...)."""
    counts: dict[str, int] = {}
    pending = 0
    last = OTHER
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        node = getattr(layer, "metadata", "") or ""  # empty for helpers (and before TensorRT 10)
        stage = _stage((node, layer.name)) or (OTHER if node else None)
        pending += 1
        if stage is not None:
            _add(counts, stage, pending)
            pending, last = 0, stage
    if pending:
        _add(counts, last, pending)
    return counts


def engine_layers_by_stage(layer_information: str) -> dict[str, int]:
    """The engine inspector's JSON (``get_engine_information``, LayerInformationFormat.JSON) -> built layers per
    stage; layers that name no node (reformats, internal kernels) count as ``other``."""
    data = json.loads(layer_information)
    counts: dict[str, int] = {}
    for layer in data.get("Layers", []):
        name = layer.get("Name", "") if isinstance(layer, dict) else str(layer)
        _add(counts, _stage((name,)) or OTHER, 1)
    return counts
