"""Issue 31's table (prefill, decode, ApET and TTFT against their floors) from one GPU session's profiles.

  python scripts/issue31_table.py OUT/issue31_*.json --out issue31_table.md

The inputs are ``scripts/gpu_profile.py`` reports (``scripts/device_run.sh issue31 llava|qwen|qwen4`` writes them,
one session, several calls). Each row of the issue picks its case by model, size, batch, ratio and ``--compile``,
taking only cases in the path's default form (no ``:packed``/``:cublas``/... switch: those are the "before" halves
of a pair); where one session profiled a case more than once the row gives the range. × floor is each process's own
(its measured matmul and copy ceilings), as the bench computes it. Written so that the docs' table is regenerated,
not copied by hand, and a missing case shows as a gap instead of an older number.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# the path's default switches (gpu_profile.parse_case); a case differing in any is a "before" form
DEFAULT_FORM = {"decode_attention": True, "gemv": True, "fold": True, "pdl": True, "per_image_kernel": True,
                "prefill_attention": "auto", "rotary_once": True, "cache_kernel": True}
TTFT_STAGES = ("vision_tower", "apet_stage1", "projector", "prefill")  # "stage floors": the stages in TTFT


@dataclass(frozen=True)
class Case:
    """Which profiled case a row reads (gpu_profile's case fields)."""

    model: str
    size: tuple[int, int]
    batch: int
    ratio: float
    compile: bool

    def matches(self, case: dict[str, Any]) -> bool:
        if "error" in case or case.get("compile_mode", "default") != "default":
            return False
        if any(case.get(key, value) != value for key, value in DEFAULT_FORM.items()):
            return False
        return (case["model"] == self.model and tuple(case["size"]) == self.size and case["batch"] == self.batch
                and abs(case["ratio"] - self.ratio) < 1e-9 and bool(case["compile"]) == self.compile)


LLAVA = Case("llava-shapes", (640, 480), 1, 0.11, True)
LLAVA_B4 = Case("llava-shapes", (640, 480), 4, 0.11, True)
NEXT = Case("llava-next-shapes", (672, 672), 1, 1.0, False)
QWEN = {(ratio, batch): Case("qwen2.5-vl-7b-shapes", (1344, 1344), batch, ratio, True)
        for ratio in (0.3, 1.0) for batch in (1, 4)}


@dataclass(frozen=True)
class Row:
    """One line of the issue's table: a stage of a case against a target, in × floor or in ms."""

    label: str
    case: Case
    stage: str
    target: float
    unit: str  # "x floor": the stage's ms over its floor; "ms": the stage's ms


def timed_stages(wanted: Case, stage: str, cases: list[dict[str, Any]]) -> Iterator[tuple[dict, dict]]:
    """Every profiled case ``wanted`` matches that timed ``stage``, with that stage's record: which cases a row
    reads, in one place for the table and the profile summary."""
    for case in cases:
        if wanted.matches(case) and stage in case["stages"]:
            yield case, case["stages"][stage]


def stage_values(wanted: Case, stage: str, cases: list[dict[str, Any]]) -> list[tuple[float, float | None]]:
    """(ms, × floor) of ``stage`` in every profiled case ``wanted`` matches; TTFT against its stages' floors."""
    found = []
    for case, timed in timed_stages(wanted, stage, cases):
        over = timed.get("over_floor")
        if stage == "ttft":
            floors = sum(case["stages"][name]["floor_ms"] for name in TTFT_STAGES if name in case["stages"])
            over = round(timed["ms"] / floors, 2) if floors > 0 else None
        found.append((timed["ms"], over))
    return found


ROWS = (
    Row("LLaVA-1.5-7B decode step, batch 1 (`--compile`)", LLAVA, "decode_step", 1.2, "x floor"),
    Row("LLaVA-1.5-7B decode step, batch 4 (`--compile`)", LLAVA_B4, "decode_step", 1.2, "x floor"),
    Row("Qwen2.5-VL-7B decode step, 0.3, batch 1 (`--compile`)", QWEN[0.3, 1], "decode_step", 1.2, "x floor"),
    Row("Qwen2.5-VL-7B decode step, 1.0, batch 1 (`--compile`)", QWEN[1.0, 1], "decode_step", 1.2, "x floor"),
    Row("Qwen2.5-VL-7B decode step, 0.3, batch 4 (`--compile`)", QWEN[0.3, 4], "decode_step", 1.2, "x floor"),
    Row("Qwen2.5-VL-7B decode step, 1.0, batch 4 (`--compile`)", QWEN[1.0, 4], "decode_step", 1.2, "x floor"),
    Row("LLaVA-1.5-7B prefill, 136 tokens (`--compile`)", LLAVA, "prefill", 1.3, "x floor"),
    Row("Qwen2.5-VL-7B prefill, 2,065 tokens (1.0, `--compile`)", QWEN[1.0, 1], "prefill", 1.2, "x floor"),
    Row("LLaVA-NeXT-7B prefill, 2,968 tokens (no compile)", NEXT, "prefill", 1.3, "x floor"),
    Row("LLaVA-1.5-7B ApET stage 1 (in the pipeline)", LLAVA, "apet_stage1", 0.1, "ms"),
    Row("LLaVA-1.5-7B ApET stage 2 (in the pipeline)", LLAVA, "apet_stage2", 0.1, "ms"),
    Row("LLaVA-1.5-7B TTFT at 0.11 (`--compile`)", LLAVA, "ttft", 5.5, "ms"),
    Row("Qwen2.5-VL-7B 1344² TTFT at 0.3 (`--compile`)", QWEN[0.3, 1], "ttft", 36.0, "ms"),
)
TTFT_RATIO_TARGET = 0.55  # Qwen2.5-VL-7B TTFT(0.3) / TTFT(1.0)


def _span(values: list[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}–{high:.{digits}f}"


def table(reports: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The markdown table and its rows as data (met: every profiled value within the target; None: not run)."""
    cases = [case for report in reports for case in report["cases"]]
    lines = ["| row | now | × floor | target | |", "|---|---:|---:|---:|---|"]
    rows: list[dict[str, Any]] = []
    for row in ROWS:
        found = stage_values(row.case, row.stage, cases)
        ms, overs = [v[0] for v in found], [v[1] for v in found if v[1] is not None]
        judged = overs if row.unit == "x floor" else ms
        met = None if not judged else max(judged) <= row.target
        target = f"≤ {row.target:g} × floor" if row.unit == "x floor" else f"≤ {row.target:g} ms"
        verdict = {None: "not run", True: "met", False: "missed"}[met]
        lines.append(f"| {row.label} | {_span(ms, 2) + ' ms' if ms else '–'} | {_span(overs, 2) if overs else '–'} "
                     f"| {target} | {verdict} |")
        rows.append({"row": row.label, "ms": ms, "over_floor": overs, "target": row.target, "unit": row.unit,
                     "met": met})
    low = [ms for ms, _ in stage_values(QWEN[0.3, 1], "ttft", cases)]
    high = [ms for ms, _ in stage_values(QWEN[1.0, 1], "ttft", cases)]
    if low and high:
        ratios = [a / b for a in low for b in high]
        met = max(ratios) <= TTFT_RATIO_TARGET
        lines.append(f"| Qwen2.5-VL-7B TTFT(0.3) / TTFT(1.0) | {_span(ratios, 3)} | | ≤ {TTFT_RATIO_TARGET} | "
                     f"{'met' if met else 'missed'} |")
        rows.append({"row": "Qwen2.5-VL-7B TTFT(0.3) / TTFT(1.0)", "ratio": ratios, "target": TTFT_RATIO_TARGET,
                     "met": met})
    return "\n".join(lines), rows


def profile_summary(reports: list[dict[str, Any]], top: int = 3) -> str:
    """Where each row's stage spends its time, from the same cases (gpu_profile's kernel profile): the kernels'
    summed device time against the stage's wall time (the rest is launch gaps and waits; 0 where the profiled
    calls' kernel time exceeds the timed median, as in a bound-by-compute prefill) and its top kernels.
    The issue asks for this beside the table: what stands in the way of a missed target is read from here."""
    cases = [case for report in reports for case in report["cases"]]
    lines = ["| row | ms | kernels | kernel ms | gaps ms | top kernels (share of kernel time) |",
             "|---|---:|---:|---:|---:|---|"]
    for row in ROWS:
        for _, timed in timed_stages(row.case, row.stage, cases):
            if "kernel_us" not in timed:
                continue
            kernel_ms = timed["kernel_us"] / 1000
            kernels = "; ".join(f"`{k['kernel'][:60]}` ×{k['calls']} {k['share']:.0%}"
                                for k in timed.get("top", [])[:top] if k.get("share") is not None)
            lines.append(f"| {row.label} | {timed['ms']:.2f} | {timed['kernels']:g} | {kernel_ms:.2f} | "
                         f"{max(timed['ms'] - kernel_ms, 0.0):.2f} | {kernels} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="scripts/gpu_profile.py reports of one session")
    parser.add_argument("--out", type=Path, help="write the markdown table here (and its rows beside it, .json)")
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    devices = sorted({report["device"] for report in reports})
    markdown, rows = table(reports)
    header = f"Issue 31's rows on {', '.join(devices)} ({', '.join(path.name for path in args.reports)}):\n\n"
    summary = "\n\nWhere each stage's time goes (the same cases' kernel profiles):\n\n" + profile_summary(reports)
    print(header + markdown + summary)
    if args.out:
        args.out.write_text(header + markdown + summary + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"devices": devices, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
