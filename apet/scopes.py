"""Name scopes of the exported graphs: one contract between the exporter and every profile reader.

The TorchScript exporter prefixes each ONNX node with the module path it was
traced in (``/apet_stage1/TopK``, ``/layers.15/MatMul_2``); TensorRT keeps
those names as layer names, so ``trtexec --dumpProfile``/``--exportLayerInfo``,
Nsight Systems and ONNX Runtime's profiler can attribute time to the vision
tower, each ApET stage and each decoder layer. The exporter uses these names;
:mod:`apet.engines.trtexec` and the runtime's profilers read them back.
"""

from __future__ import annotations

import re

VISION = "vision"  # vision tower up to the select layer
APET_STAGE1 = "apet_stage1"  # ApET at the vision output
PROJECTOR = "projector"  # the multimodal projector on the kept tokens
APET_STAGE2 = "apet_stage2"  # ApET inside the LLM (compress the image span, rebuild the sequence)
MASK = "mask"  # attention-mask bias
LAYER_PREFIX = "layers."  # decoder layer i is scope "layers.i"
APET_SCOPES = (APET_STAGE1, APET_STAGE2)

# a node name inside a (possibly fused) TensorRT layer name: "/scope/..." at the start, after "[", " ", "+", "("
# or the "..." of a Myelin "{ForeignNode[/first/node.../last/node]}"
_NODE = re.compile(r"(?:^|[\[\s+(]|\.\.\.)/([A-Za-z_][\w.]*)/")


def layer_scope(index: int) -> str:
    return f"{LAYER_PREFIX}{index}"


def scopes_in(name: str) -> list[str]:
    """Top-level scopes named in one engine/profile layer name, in order of appearance (deduplicated)."""
    found: list[str] = []
    for match in _NODE.finditer(name):
        if match.group(1) not in found:
            found.append(match.group(1))
    return found


def base_scope(scope: str) -> str:
    """A scope entered twice gets a suffix from the exporter (``mask_1``): the base name is the scope."""
    return re.sub(r"_\d+$", "", scope)


def stage_of(scope: str) -> str:
    """Coarse stage of a scope: the decoder layers collapse into one "llm layers" stage."""
    scope = base_scope(scope)
    if scope.startswith(LAYER_PREFIX) and scope[len(LAYER_PREFIX):].isdigit():
        return "llm layers"
    return scope
