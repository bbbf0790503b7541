"""report.json / report.md / retention.png of an apet-eval run."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from apet.atomic import write_atomic
from apet.eval.scoring import normalize_answer, yes_no, yes_no_scores
from apet.media.dataset import EvalItem


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def build_report(records: list[dict[str, Any]], items: list[EvalItem], cfg: Any, stages: int | None = None
                 ) -> dict[str, Any]:
    """Scores per (method, ratio, benchmark), per question type, POPE metrics, and retention vs ratio 1.0."""
    gold = {(i.benchmark, i.id): i for i in items}
    groups: dict[tuple[str, float, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if (r["benchmark"], r["id"]) in gold:
            groups[(r["method"], r["ratio"], r["benchmark"], r.get("weights", "fp16"))].append(r)
    rows = []
    for (method, ratio, benchmark, weights), group in sorted(groups.items(),
                                                             key=lambda kv: (kv[0][2], kv[0][3], kv[0][0], -kv[0][1])):
        by_type: dict[str, list[float]] = defaultdict(list)
        for r in group:
            by_type[r["type"]].append(r["score"])
        row = {"method": method, "ratio": ratio, "weights": weights, "benchmark": benchmark, "n": len(group),
               "score": _mean([r["score"] for r in group]), "errors": sum("error" in r for r in group),
               "by_type": {t: {"n": len(v), "score": _mean(v)} for t, v in by_type.items()}}
        yesno = [r for r in group if r["type"] == "yesno"]
        if yesno:
            scores = yes_no_scores([normalize_answer(gold[(r["benchmark"], r["id"])].answers[0]) for r in yesno],
                                   [yes_no(r["prediction"]) for r in yesno])
            row["yesno"] = scores.__dict__
        rows.append(row)
    full = {r["benchmark"]: r["score"] for r in rows if r["ratio"] == 1.0 and r["weights"] == "fp16"}
    full.update({r["benchmark"]: r["score"] for r in rows if r["ratio"] == 1.0 and r["benchmark"] not in full})
    for row in rows:
        base = full.get(row["benchmark"])
        row["retention"] = (row["score"] / base) if base else None
    mean_retention: dict[str, float] = {}
    for key in sorted({(r["method"], r["ratio"], r["weights"]) for r in rows}):
        values = [r["retention"] for r in rows
                  if (r["method"], r["ratio"], r["weights"]) == key and r["retention"] is not None]
        if values:
            suffix = "" if key[2] == "fp16" else f"/{key[2]}"
            mean_retention[f"{key[0]}@{key[1]:g}{suffix}"] = _mean(values)
    return {"source": str(cfg.source), "stages": cfg.stages if stages is None else stages, "items": len(items),
            "benchmarks": sorted({i.benchmark for i in items}), "rows": rows, "mean_retention": mean_retention}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# apet-eval: {report['source']}", "",
             f"{report['items']} questions in {', '.join(report['benchmarks'])}; {report['stages']} compression "
             f"stage{'s' if report['stages'] != 1 else ''}. Retention = score / score at ratio 1.0 on the same "
             "questions.", "",
             "| benchmark | method | ratio | n | score | retention | by type | errors |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for row in report["rows"]:
        types = ", ".join(f"{t} {v['score']:.3f}" for t, v in sorted(row["by_type"].items()))
        retention = f"{row['retention']:.3f}" if row["retention"] is not None else "–"
        method = row["method"] if row.get("weights", "fp16") == "fp16" else f"{row['method']} ({row['weights']})"
        lines.append(f"| {row['benchmark']} | {method} | {row['ratio']:g} | {row['n']} | "
                     f"{row['score']:.4f} | {retention} | {types} | {row['errors']} |")
    counts = report.get("predictions")
    if counts:
        changed = f" ({counts['changed_rows']} question(s) changed since an earlier run: asked again)" \
            if counts["changed_rows"] else ""
        lines += ["", f"Answers: {counts['reused']} reused from an earlier run (same row and setting), "
                  f"{counts['run']} computed now{changed}."]
    if report["mean_retention"]:
        lines += ["", "| setting | mean retention over benchmarks |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in report["mean_retention"].items()]
    if report.get("weight_agreement"):
        lines += ["", "Quantized LLM weights vs fp16, teacher-forced on the eval prompts (prompt + fp16's greedy "
                  "answer, every position):", "", "| weights | top-1 agreement | mean KL (nats) | positions |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['top1_agreement']:.4f} | {v['mean_kl']:.5f} | {v['positions']} |"
                  for k, v in report["weight_agreement"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, value in report["mean_retention"].items():
        method, ratio = key.split("@")
        ratio, _, weights = ratio.partition("/")
        method = f"{method} ({weights})" if weights else method
        by_method[method].append((float(ratio), value))
    for method, points in sorted(by_method.items()):
        points = sorted(points + ([(1.0, 1.0)] if all(r != 1.0 for r, _ in points) else []))
        ax.plot(*zip(*points), "o-", label=method)
    ax.set_xlabel("ratio (retained fraction of visual tokens)")
    ax.set_ylabel("retention (score / score at 1.0)")
    ax.set_title("Accuracy retention vs ratio")
    if by_method:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    write_atomic(out / "report.json", json.dumps(report, indent=1))
    write_atomic(out / "report.md", markdown(report))
    plot(report, out / "retention.png")
