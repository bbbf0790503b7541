"""The check's report: one row per stage in graph order, the first departing scope, JSON and text forms."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from apet.contracts.comparison import DEFAULT_TOLERANCE, StageRow, Tolerance

__all__ = ["DEFAULT_TOLERANCE", "CheckReport", "Comparison", "StageRow", "Tolerance"]
SCHEMA_VERSION = 1


@dataclass
class Comparison:
    reference: str
    candidate: str
    stages: list[StageRow]
    first_departure: str | None  # the first stage (or, with --per-layer, scope) beyond tolerance
    first_departure_tensor: str | None = None
    reduced_onnx: str | None = None
    margins: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckReport:
    runners: list[str]
    tolerance: dict[str, float]
    per_layer: bool
    comparisons: list[Comparison]

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    def stage_names(self) -> list[str]:
        return [row.stage for row in self.comparisons[0].stages] if self.comparisons else []

    def to_text(self) -> str:
        lines = [f"apet check: {', '.join(self.runners)} (atol {self.tolerance['atol']:g}, "
                 f"rtol {self.tolerance['rtol']:g})"]
        for comp in self.comparisons:
            lines.append(f"\n{comp.candidate} vs {comp.reference}")
            for row in comp.stages:
                shown = ", ".join(f"{k} {_fmt(v)}" for k, v in row.metrics.items() if not isinstance(v, (list, dict)))
                lines.append(f"  {'ok  ' if row.passed else 'DIFF'} {row.stage:<14} {shown}")
            for side in ("reference", "candidate"):
                for row, m in enumerate(comp.margins.get(side, [])):
                    lines.append(f"  stage-1 margins {side} row {row}: selection {m['selection_margin']:.4g}, merge "
                                 f"min {m['min_merge_margin']:.3g} / median {m['median_merge_margin']:.3g} "
                                 f"over {m['dropped_tokens']} dropped tokens")
            for change in comp.margins.get("merge_target_changes", []):
                lines.append(f"  merge changed: row {change['row']} token {change['token']} joins "
                             f"{change['candidate_target']} not {change['reference_target']} (cosine gap "
                             f"{change['reference_gap']:.3g} reference, {change['candidate_gap']:.3g} candidate)")
            where = comp.first_departure or "none: every stage within tolerance"
            lines.append(f"  first departure: {where}" + (f" ({comp.first_departure_tensor})"
                                                          if comp.first_departure_tensor else ""))
            if comp.reduced_onnx:
                lines.append(f"  reduced ONNX of that scope: {comp.reduced_onnx}")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if not isinstance(v, (list, dict)))
    return str(value)
