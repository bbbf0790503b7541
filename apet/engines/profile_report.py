"""trtexec's JSON (``--exportTimes``, ``--exportProfile``) -> latency tables and time per stage.

Layer names in a TensorRT profile are the ONNX node names of the layers they
came from (``/apet_stage1/TopK``), joined with `` + `` when TensorRT fuses
nodes and written ``{ForeignNode[/first.../last]}`` for a Myelin region. The
exporter gives every node a scope (:mod:`apet.scopes`), so time can be
grouped per stage: vision tower, ApET stage 1, projector, decoder layers,
ApET stage 2. A layer that fuses several scopes is shown as such rather than
guessed; time in layers without node names (reformats, internal kernels) is
"unattributed".
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from apet import scopes
from apet.errors import ArtifactError

OUT_DIR = "trtexec"
RUNS_FILE = "runs.json"
UNATTRIBUTED = "(unattributed)"


def _load(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read trtexec output {path}: {exc}", "re-run trtexec.sh") from exc


def summarize_times(path: Path) -> dict[str, float]:
    """``--exportTimes`` JSON (a list of per-inference records) -> median/p90 latency and GPU compute (ms)."""
    records = _load(path)
    if not isinstance(records, list) or not records:
        raise ArtifactError(f"{path} holds no timing records", "re-run trtexec with --exportTimes")
    out: dict[str, float] = {"inferences": float(len(records))}
    for key in ("latencyMs", "computeMs"):
        values = sorted(float(r[key]) for r in records if isinstance(r, dict) and key in r)
        if values:
            out[f"{key[:-2]}_median_ms"] = statistics.median(values)
            out[f"{key[:-2]}_p90_ms"] = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    return out


def profile_layers(path: Path) -> list[dict[str, Any]]:
    """``--exportProfile`` JSON -> [{name, average_ms, median_ms, percentage}] (the leading count record dropped)."""
    records = _load(path)
    if not isinstance(records, list):
        raise ArtifactError(f"{path} is not a trtexec --exportProfile list", "re-run trtexec.sh")
    return [{"name": str(r["name"]), "average_ms": float(r["averageMs"]), "median_ms": float(r.get("medianMs", 0.0)),
             "percentage": float(r.get("percentage", 0.0))}
            for r in records if isinstance(r, dict) and "name" in r and "averageMs" in r]


def top_layers(path: Path, count: int = 10) -> list[dict[str, Any]]:
    """The ``count`` most expensive layers by average time."""
    return sorted(profile_layers(path), key=lambda r: r["average_ms"], reverse=True)[:count]


def time_by_scope(layers: list[dict[str, Any]]) -> dict[str, float]:
    """Average ms per top-level scope; fused multi-scope layers keep a joined key (``layers.3+apet_stage2``)."""
    totals: dict[str, float] = defaultdict(float)
    for layer in layers:
        found = [scopes.base_scope(s) for s in scopes.scopes_in(layer["name"])]
        key = "+".join(dict.fromkeys(found)) if found else UNATTRIBUTED
        totals[key] += layer["average_ms"]
    return dict(totals)


def time_by_stage(by_scope: dict[str, float]) -> dict[str, float]:
    """Scopes collapsed into stages (every ``layers.i`` -> "llm layers"); fused keys stay as they are."""
    totals: dict[str, float] = defaultdict(float)
    for key, ms in by_scope.items():
        parts = {scopes.stage_of(part) for part in key.split("+")} if key != UNATTRIBUTED else {key}
        totals["+".join(sorted(parts)) if len(parts) > 1 else parts.pop()] += ms
    return dict(totals)


def apet_share(by_scope: dict[str, float]) -> dict[str, float]:
    """ApET's time (layers wholly inside an ApET scope), total, share, and ApET time fused with other work."""
    total = sum(by_scope.values())
    apet = sum(ms for key, ms in by_scope.items() if key in scopes.APET_SCOPES)
    fused = sum(ms for key, ms in by_scope.items()
                if "+" in key and any(part in scopes.APET_SCOPES for part in key.split("+")))
    return {"apet_ms": apet, "total_ms": total, "share": apet / total if total else 0.0, "fused_ms": fused}


def _runs(root: Path) -> list[str]:
    """Run names: those of the last emission (runs.json) that have results, else every *.times.json."""
    listed = root / RUNS_FILE
    if listed.is_file():
        names = [r.get("name") for r in _load(listed) if isinstance(r, dict)]
        return [n for n in names if isinstance(n, str) and (root / f"{n}.times.json").is_file()]
    return [p.name[: -len(".times.json")] for p in sorted(root.glob("*.times.json"))]


def _stage_table(name: str, layers: list[dict[str, Any]]) -> list[str]:
    by_scope = time_by_scope(layers)
    share = apet_share(by_scope)
    lines = [f"\n**{name}: time per stage** (sum of per-layer averages: {share['total_ms']:.4f} ms; ApET "
             f"{share['apet_ms']:.4f} ms = {100 * share['share']:.1f}%"
             + (f", plus {share['fused_ms']:.4f} ms fused with other work" if share["fused_ms"] else "") + ")",
             "", "| stage | avg ms | % |", "|---|---:|---:|"]
    stages = sorted(time_by_stage(by_scope).items(), key=lambda kv: -kv[1])
    lines += [f"| {stage} | {ms:.4f} | {100 * ms / share['total_ms'] if share['total_ms'] else 0:.1f} |"
              for stage, ms in stages]
    layer_rows = sorted(((k, v) for k, v in by_scope.items() if k.startswith(scopes.LAYER_PREFIX)),
                        key=lambda kv: [int(p) if p.isdigit() else p for p in kv[0].replace("+", ".").split(".")])
    if layer_rows:
        lines += ["", "| decoder layer | avg ms |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in layer_rows]
    lines += ["", "| top layer | avg ms | % |", "|---|---:|---:|"]
    lines += [f"| `{r['name'][:80]}` | {r['average_ms']:.4f} | {r['percentage']:.1f} |"
              for r in sorted(layers, key=lambda r: r["average_ms"], reverse=True)[:10]]
    return lines


def report(directory: Path) -> str:
    """A Markdown latency table for every run under ``directory/trtexec``, then time per stage for each run
    with a ``--exportProfile`` file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory", "pass the artifact directory trtexec.sh lives in")
    root = directory / OUT_DIR if (directory / OUT_DIR).is_dir() else directory
    names = _runs(root)
    if not names:
        raise ArtifactError(f"no trtexec results (*.times.json) under {root}",
                            "run trtexec.sh first: scripts/profile_trtexec.sh DIR (it needs trtexec on PATH)")
    lines = ["| run | median ms | p90 ms | GPU compute median ms | ApET % of layer time |",
             "|---|---:|---:|---:|---:|"]
    details: list[str] = []
    for name in names:
        s = summarize_times(root / f"{name}.times.json")
        profile = root / f"{name}.profile.json"
        share = "–"
        if profile.is_file():
            layers = profile_layers(profile)
            share = f"{100 * apet_share(time_by_scope(layers))['share']:.1f}"
            details += _stage_table(name, layers)
        lines.append(f"| {name} | {s.get('latency_median_ms', float('nan')):.3f} | "
                     f"{s.get('latency_p90_ms', float('nan')):.3f} | {s.get('compute_median_ms', float('nan')):.3f} "
                     f"| {share} |")
    return "\n".join(lines + details)
