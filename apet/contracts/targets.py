"""Which TensorRT an export is for: ``--target`` -> attention form and opset, and who can parse the result.

One home for these facts; export reads them to choose the graph's form, ``apet-build`` to refuse a builder that
cannot parse it, the README's table is this module in prose.

Attention forms:
* ``pattern`` — MatMul -> mask -> Softmax -> MatMul, rotary embedding as Mul/Slice/Concat, opset 17 by default:
  every TensorRT from 10.3 (JetPack 6) and TensorRT-RTX parses it; fusion is left to the builder's pattern matcher.
  JetPack 6 reads up to opset 21: quantized weights (``--weights int8|int4``) need 21's blocked
  ``DequantizeLinear``, which TensorRT 10.x turns into weight-only GEMMs.
* ``op`` — the opset-23 ``Attention`` and ``RotaryEmbedding`` ops, which the ONNX parser turns into TensorRT's
  IAttention / IRotaryEmbeddingLayer (``Attention`` since TensorRT 10.14, ``RotaryEmbedding`` since 10.15, per
  the onnx-tensorrt release notes; TensorRT-RTX 1.7 is verified in CI). TensorRT 10.3 parses neither.

The KV cache stays outside the op in both forms (past and new K/V concatenated in the graph): TensorRT's importer
refuses ``Attention`` nodes with more than one output, and an in-place ``TensorScatter`` cache needs opset 24 and
a different runtime contract (see docs/attention.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from apet.errors import UsageError, check_range

ATTENTION_FORMS = ("pattern", "op")
OP_FORM_OPSET = 23  # Attention and RotaryEmbedding exist from opset 23
MIN_OPSET = 17
MAX_OPSET = 23
PATTERN_OPSET = 17
# (kind, first version that parses the op form); a kind missing here is not refused up front: parsing decides
OP_FORM_BUILDERS = {"tensorrt": (10, 15)}


@dataclass(frozen=True)
class Target:
    """A family of TensorRT builds an artifact is exported for."""

    name: str
    attention: str  # default attention form
    max_opset: int  # highest opset its ONNX parser reads
    builders: str  # who it is for, in words (help text, README)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("jetpack6", "pattern", 21, "Jetson Orin on JetPack 6.x (TensorRT 10.3), any TensorRT 10.x before 10.15"),
    Target("jetpack7", "op", MAX_OPSET, "Jetson on JetPack 7.x with TensorRT >= 10.15"),
    Target("trt10.15+", "op", MAX_OPSET, "desktop / datacenter TensorRT >= 10.15 (and 11.x)"),
    Target("rtx", "op", MAX_OPSET, "TensorRT-RTX on RTX GPUs (1.7 verified)"),
)}
DEFAULT_TARGET = "jetpack6"  # parses everywhere
OP_DEFAULT_TARGET = "trt10.15+"  # what --attention op alone means


@dataclass(frozen=True)
class ExportForm:
    """How the graphs of one artifact are written (recorded in the manifest: target, attention, opset)."""

    target: str
    attention: str
    opset: int

    @property
    def uses_attention_op(self) -> bool:
        return self.attention == "op"


def resolve_form(target: str | None = None, attention: str | None = None, opset: int | None = None) -> ExportForm:
    """``--target`` / ``--attention`` / ``--opset`` -> a consistent form; UsageError names the conflict."""
    if attention is not None and attention not in ATTENTION_FORMS:
        raise UsageError(f"--attention {attention!r} is unknown", "use op (ONNX Attention, TensorRT >= 10.15) or "
                         "pattern (MatMul-Softmax-MatMul, every TensorRT)")
    name = target or (OP_DEFAULT_TARGET if attention == "op" else DEFAULT_TARGET)
    if name not in TARGETS:
        raise UsageError(f"--target {name!r} is unknown", f"use one of {', '.join(TARGETS)}")
    chosen = TARGETS[name]
    attention = attention or chosen.attention
    if attention == "op" and chosen.attention != "op":
        raise UsageError(f"--attention op cannot be parsed by --target {name} ({chosen.builders})",
                         "pass --target jetpack7, trt10.15+ or rtx, or --attention pattern")
    opset = opset if opset is not None else (OP_FORM_OPSET if attention == "op" else PATTERN_OPSET)
    check_range("--opset", opset, OP_FORM_OPSET if attention == "op" else MIN_OPSET, chosen.max_opset,
                fix=f"--attention {attention} for --target {name} takes opset "
                    f"{OP_FORM_OPSET if attention == 'op' else MIN_OPSET}..{chosen.max_opset}; drop --opset for "
                    "the target's default")
    return ExportForm(name, attention, opset)


def release(text: str) -> tuple[int, ...]:
    """A version string's (major, minor), as builders and runtimes are compared; (0,) where it has no number."""
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2]) or (0,)


def builder_problem(form: ExportForm, kind: str, version: str) -> str | None:
    """Why builder ``kind`` ``version`` cannot parse an artifact of ``form``; None when it can, or when only
    parsing can tell (then the parser's error names --target)."""
    first = OP_FORM_BUILDERS.get(kind)
    if form.uses_attention_op and first is not None and release(version) < first:
        return (f"{kind} {version} cannot parse the ONNX Attention / RotaryEmbedding ops of this artifact "
                f"(it needs {kind} >= {'.'.join(map(str, first))})")
    return None
