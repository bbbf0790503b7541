"""scripts/issue31_table.py: issue 31's table regenerated from gpu_profile.py reports (docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parents[1] / "scripts"


def _script(name: str):
    sys.path.insert(0, str(SCRIPTS))  # gpu_profile imports its sibling gpu_variants
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


table_script = _script("issue31_table")


def _stage(ms: float, floor: float) -> dict:
    return {"ms": ms, "floor_ms": floor, "over_floor": round(ms / floor, 2) if floor else None}


def _case(model: str, size: list[int], batch: int, ratio: float, compile_: bool, **stages: tuple[float, float]):
    return {"model": model, "size": size, "batch": batch, "ratio": ratio, "compile": compile_,
            **table_script.DEFAULT_FORM, "compile_mode": "default",
            "stages": {name: _stage(*value) for name, value in stages.items()}}


def _llava(decode_ms: float, **form) -> dict:
    case = _case("llava-shapes", [640, 480], 1, 0.11, True, vision_tower=(1.5, 0.5), apet_stage1=(0.09, 0.0003),
                 projector=(0.05, 0.01), prefill=(5.0, 3.2), decode_step=(decode_ms, 3.2), ttft=(6.6, 0.0),
                 apet_stage2=(0.05, 0.0003))
    return {**case, **form}


def _qwen(ratio: float, ttft: float) -> dict:
    return _case("qwen2.5-vl-7b-shapes", [1344, 1344], 1, ratio, True, vision_tower=(25.0, 16.0),
                 apet_stage1=(0.3, 0.02), projector=(0.04, 0.0), prefill=(16.0 if ratio < 1 else 46.0, 12.0),
                 decode_step=(4.0, 3.4), ttft=(ttft, 0.0))


def _rows(reports):
    markdown, rows = table_script.table(reports)
    return markdown, {row["row"]: row for row in rows}


def test_rows_read_the_default_form_and_give_ranges() -> None:
    reports = [{"device": "H200", "cases": [_llava(3.9), _llava(3.7, prefill_attention="packed")]},
               {"device": "H200", "cases": [_llava(4.0), _qwen(0.3, 42.0), _qwen(1.0, 74.0),
                                            {"model": "llava-shapes", "error": "OOM"}]}]
    markdown, rows = _rows(reports)
    decode = rows["LLaVA-1.5-7B decode step, batch 1 (`--compile`)"]
    assert decode["ms"] == [3.9, 4.0]  # the :packed ("before") case is not read; the error case is skipped
    assert decode["over_floor"] == [1.22, 1.25] and decode["met"] is False
    assert "| 3.90–4.00 ms | 1.22–1.25 | ≤ 1.2 × floor | missed |" in markdown
    assert rows["LLaVA-1.5-7B ApET stage 1 (in the pipeline)"]["met"] is True  # 0.09 ms <= 0.1 ms
    assert rows["LLaVA-1.5-7B decode step, batch 4 (`--compile`)"]["met"] is None  # not profiled: a gap, not a pass
    assert "| LLaVA-1.5-7B decode step, batch 4 (`--compile`) | – | – | ≤ 1.2 × floor | not run |" in markdown
    ttft = rows["Qwen2.5-VL-7B 1344² TTFT at 0.3 (`--compile`)"]
    assert ttft["over_floor"] == [round(42.0 / (16.0 + 0.02 + 0.0 + 12.0), 2)]  # × the stage floors in TTFT
    assert ttft["met"] is False
    ratio = rows["Qwen2.5-VL-7B TTFT(0.3) / TTFT(1.0)"]
    assert ratio["ratio"] == [42.0 / 74.0] and ratio["met"] is False
    assert re.search(r"\| Qwen2.5-VL-7B TTFT\(0.3\) / TTFT\(1.0\) \| 0.568 \| \| ≤ 0.55 \| missed \|", markdown)


def test_the_device_runs_cases_are_the_rows_cases() -> None:
    """Every case scripts/device_run.sh issue31 profiles parses (gpu_profile.parse_case) to the default form the
    table reads, and every row's case is among them: a renamed case would leave a row 'not run'."""
    gpu_profile = _script("gpu_profile")
    text = (SCRIPTS / "device_run.sh").read_text()
    block = text[text.index("  issue31)"):text.index("  profile)")]
    cases = [gpu_profile.parse_case(word) for line in re.findall(r"cases=\(([^)]*)\)", block) for word in line.split()]
    assert len(cases) == 7
    for case in cases:
        assert {key: case[key] for key in table_script.DEFAULT_FORM} == table_script.DEFAULT_FORM
        case["size"] = list(case["size"])
    for row in table_script.ROWS:
        assert any(row.case.matches({**case, "stages": {}}) for case in cases), row.label


def test_profile_summary_gives_each_rows_kernel_time_gaps_and_top_kernels() -> None:
    case = _llava(4.0)
    case["stages"]["decode_step"].update(kernels=230.0, kernel_us=3600.0, top=[
        {"kernel": "gemv_fold_kernel", "calls": 96, "us_per_step": 2700.0, "share": 0.75},
        {"kernel": "decode_attention", "calls": 32, "us_per_step": 540.0, "share": 0.15}])
    packed = _llava(3.0, prefill_attention="packed")  # a "before" form: not summarised either
    packed["stages"]["decode_step"].update(kernels=1.0, kernel_us=1.0, top=[])
    summary = table_script.profile_summary([{"device": "H200", "cases": [case, packed]}], top=1)
    lines = [line for line in summary.splitlines() if line.startswith("| LLaVA")]
    assert lines == ["| LLaVA-1.5-7B decode step, batch 1 (`--compile`) | 4.00 | 230 | 3.60 | 0.40 | "
                     "`gemv_fold_kernel` ×96 75% |"]  # cases without a kernel profile (the others) give no line


def test_the_docs_table_is_the_scripts_output_for_the_committed_reports() -> None:
    """docs/benchmarks.md's issue-31 table and profile summary are regenerated from the committed raw JSON, not
    edited by hand: the script's output for those files appears in the docs verbatim."""
    import json

    root = Path(__file__).parents[1]
    runs = sorted((root / "docs" / "benchmarks" / "h200-issue31").glob("issue31_[lq]*.json"))
    assert [path.name for path in runs] == ["issue31_llava.json", "issue31_qwen.json", "issue31_qwen4.json"]
    reports = [json.loads(path.read_text()) for path in runs]
    markdown, rows = table_script.table(reports)
    docs = (root / "docs" / "benchmarks.md").read_text()
    assert markdown in docs
    assert table_script.profile_summary(reports) in docs
    assert all(row["met"] is not None for row in rows)  # one session profiled every row's case
