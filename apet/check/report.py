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
            stage2 = next((r for r in comp.stages if r.stage == "apet_stage2"), None)
            span = stage2.metrics.get("span_token_diff") if stage2 else None
            if span:
                lines.append(f"  stage-2 span: {span['outliers']} of {span['tokens']} kept tokens differ (max "
                             f"{span['max']:.4g}, median {span['median']:.3g}); rows outside it: max_abs "
                             f"{stage2.metrics['outside_span_max_abs']:.4g}")
            lines += _margin_lines("stage-1", comp.margins)
            lines += _margin_lines("stage-2", comp.margins.get("stage2", {}))
            where = comp.first_departure or "none: every stage within tolerance"
            lines.append(f"  first departure: {where}" + (f" ({comp.first_departure_tensor})"
                                                          if comp.first_departure_tensor else ""))
            if comp.reduced_onnx:
                lines.append(f"  reduced ONNX of that scope: {comp.reduced_onnx}")
        return "\n".join(lines)


def _margin_lines(stage: str, margins: dict[str, Any]) -> list[str]:
    lines = []
    for side in ("reference", "candidate"):
        for row, m in enumerate(margins.get(side, [])):
            order = f", basis order {m['basis_order_margin']:.4g}" if "basis_order_margin" in m else ""
            lines.append(f"  {stage} margins {side} row {row}: selection {m['selection_margin']:.4g}{order}, merge "
                         f"min {m['min_merge_margin']:.3g} / median {m['median_merge_margin']:.3g} over "
                         f"{m['dropped_tokens']} dropped tokens")
    for change in margins.get("merge_target_changes", []):
        lines.append(f"  {stage} merge changed: row {change['row']} token {change['token']} joins "
                     f"{change['candidate_target']} not {change['reference_target']} (cosine gap "
                     f"{change['reference_gap']:.3g} reference, {change['candidate_gap']:.3g} candidate)")
    for change in margins.get("basis_slot_changes", []):
        lines.append(f"  {stage} basis slot changed: row {change['row']} token {change['token']} receives basis "
                     f"vector {change['candidate_basis']} not {change['reference_basis']} (error rank "
                     f"{change['candidate_rank']} not {change['reference_rank']}; error "
                     f"{change['reference_error']:.6g} reference, {change['candidate_error']:.6g} candidate)")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if not isinstance(v, (list, dict)))
    return str(value)
