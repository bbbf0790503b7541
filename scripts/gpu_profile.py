"""Where each stage of the torch GPU path spends its time (run by hand on a CUDA machine).

  python scripts/gpu_profile.py --out profile.json llava-shapes:1x1:b1:r0.11:s2:compile qwen2.5-vl-7b-shapes:1344x1344

Each case is ``MODEL`` followed by any of ``:WxH :bN :rRATIO :sSTAGES :compile :sdpa :cublas :unfolded :nopdl
:perimageops :packed :rotaryeach :cacheassign :autotune``
(``sdpa``: decode attends through SDPA, not :mod:`apet.kernels.decode_attention`; ``cublas``: every skinny matmul is
cuBLAS, not :mod:`apet.kernels.gemv`'s measured choice; both together are the path before stop 35; ``unfolded``: the
norms, silu·mul and residual adds stay their own kernels, not folded into the one-row projections,
:mod:`apet.kernels.fused_gemv`; ``nopdl``: no kernel launched as a programmatic dependent,
:mod:`apet.kernels.dependent_launch`; ``perimageops``: per-image ApET budgets, Qwen2.5-VL's, as torch ops, not in
the stage kernel, ``apet.compression.FUSED["per_image"]``; ``packed``: an unpadded prompt's prefill attends over
packed segments, FlashAttention varlen, as before the causal form, ``StaticDecoder.prefill_attention``;
``rotaryeach``: under ``--compile`` the prefill's rotary tables are left to Inductor (inlined into every layer's
kernel), as before stop 52, not computed once, ``apet.runtime.static_decoder.ROTARY_ONCE``; ``cacheassign``: the
uncompiled prefill writes its keys and values into the cache by torch's assignment, as before stop 52, not with
:mod:`apet.kernels.cache_write`; ``autotune``: compiled in ``max-autotune`` mode, Inductor's GEMM templates timed
against cuBLAS per matmul shape, :mod:`apet.runtime.compiled`).
For every stage of the apet path (vision tower,
ApET stage 1, projector, prefill, one decode step, ApET stage 2) it records the median time of its captured
CUDA graph, the stage's floor (apet.bench.flops, as the bench computes it), the number of kernels and their
summed device time (time between kernels = launch gaps), and the top kernels. The profile summaries in
docs/benchmarks.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_variants import kernel_profile  # noqa: E402

from apet.bench.run import _plan, measure_ceilings, stage_costs  # noqa: E402
from apet.bench.stages import ApetPath, Request  # noqa: E402
from apet.bench.timing import time_call  # noqa: E402
from apet.compression import FUSED  # noqa: E402
from apet.kernels import cache_write, decode_attention, dependent_launch, fused_gemv, gemv  # noqa: E402
from apet.models.registry import load_adapter  # noqa: E402
from apet.runtime.static_decoder import ROTARY_ONCE  # noqa: E402

FLAGS: dict[str, dict[str, Any]] = {  # a case's named switches (see the module docstring) -> what they set
    "compile": {"compile": True}, "sdpa": {"decode_attention": False}, "cublas": {"gemv": False},
    "unfolded": {"fold": False}, "nopdl": {"pdl": False}, "perimageops": {"per_image_kernel": False},
    "packed": {"prefill_attention": "packed"}, "rotaryeach": {"rotary_once": False},
    "cacheassign": {"cache_kernel": False}, "autotune": {"compile": True, "compile_mode": "max-autotune"}}


def parse_case(text: str) -> dict[str, Any]:
    model, *parts = text.split(":")
    case: dict[str, Any] = {"model": model, "size": (640, 480), "batch": 1, "ratio": 0.11, "stages": 1,
                            "compile": False, "decode_attention": True, "gemv": True, "fold": True, "pdl": True,
                            "per_image_kernel": True, "prefill_attention": "auto",
                            "rotary_once": True, "cache_kernel": True, "compile_mode": "default"}
    for part in parts:
        if part in FLAGS:
            case.update(FLAGS[part])
        elif "x" in part and part[0].isdigit():
            w, h = part.split("x")
            case["size"] = (int(w), int(h))
        elif part.startswith("b"):
            case["batch"] = int(part[1:])
        elif part.startswith("r"):
            case["ratio"] = float(part[1:])
        elif part.startswith("s"):
            case["stages"] = int(part[1:])
    return case


def profile_case(adapter: Any, case: dict[str, Any], ceilings: dict[str, float]) -> dict[str, Any]:
    request = Request(case["batch"], 40, 16, case["size"])
    plan = _plan(adapter, case["ratio"], case["stages"])
    t0 = time.perf_counter()
    path = ApetPath(adapter, plan, request, graphs=True, compile=case["compile"], max_context=4096 + 512,
                    prefill_attention=case["prefill_attention"], compile_mode=case["compile_mode"])
    setup_s = time.perf_counter() - t0
    tokens, keep = int(path.features.shape[1]), int(path.kept[1].shape[1])
    costs, _ = stage_costs(adapter, plan.stage1, plan.stage2, request, plan.stage1.basis, tokens, keep,
                           path.visual_tokens, path.views)
    floors = {k: c.floor_ms(ceilings["matmul_tflops"], ceilings["bandwidth_gbs"]) for k, c in costs.items()}
    token = torch.zeros(case["batch"], dtype=torch.long, device=adapter.device)
    position = torch.from_numpy(path.last_position + 1).to(adapter.device)
    t_in, i_in = path.kept
    calls: dict[str, Callable[[], Any]] = {
        "vision_tower": lambda: path.vision(**path.vision_inputs),
        "apet_stage1": lambda: path.apet1(x=path.features),
        "projector": lambda: path.projector(t=t_in, i=i_in),
        "prefill": lambda: path.prefill(**path.prefill_inputs),
        "decode_step": lambda: path.decode(0, token=token, position=position),
        "ttft": path.first_token,  # vision -> ApET -> projector -> prefill -> argmax, replays back to back
    }
    if path.apet2 is not None:
        calls["apet_stage2"] = lambda: path.apet2(x=path.apet2_input)
    stages = {}
    for name, fn in calls.items():
        ms = time_call(fn, device=adapter.device, repeats=30).median_ms
        floor = floors.get(name, 0.0)
        stages[name] = {"ms": round(ms, 4), "floor_ms": round(floor, 4),
                        "over_floor": round(ms / floor, 2) if floor > 0 else None, **kernel_profile(fn)}
        print(case["model"], name, stages[name]["ms"], "ms", stages[name]["over_floor"], "x floor",
              stages[name]["kernels"], "kernels", flush=True)
    visual_tokens, views = path.visual_tokens, path.views
    prefill_form = path.decoder.prefill_form(path.prefill_inputs["visual"], path.prompt_padding)
    calls.clear()
    return {**case, "apet_stages": case["stages"], "setup_s": round(setup_s, 1), "tokens": tokens, "keep": keep,
            "visual_tokens": visual_tokens, "views": views, "prefill_form": prefill_form,
            "stages": stages,  # "stages": the timed stages
            "fold_choices": fold_choices()}


def fold_choices() -> list[dict[str, Any]]:
    """Each folded projection's timed choice so far (fused_gemv.folded_choice): its kind and shapes, and the
    configuration taken or None where the unfused kernels were faster (the fold refused)."""
    return [{"kind": kind, "rows": list(key[0]), "weight": list(key[1]),
             "choice": None if config is None else str(config)} for (kind, key), config in fused_gemv._choices.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    ceilings = measure_ceilings(torch.device("cuda"), torch.float16)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "ceilings": ceilings, "cases": []}
    adapters: dict[str, Any] = {}
    for text in args.cases:
        case = parse_case(text)
        if case["model"] not in adapters:
            adapters.clear()
            torch.cuda.empty_cache()
            adapters[case["model"]] = load_adapter(case["model"], dtype=torch.float16, device="cuda")
        decode_attention.ENABLED["value"], gemv.ENABLED["value"] = case["decode_attention"], case["gemv"]
        fused_gemv.ENABLED["value"], dependent_launch.ENABLED["value"] = case["fold"], case["pdl"]
        FUSED["per_image"] = case["per_image_kernel"]
        ROTARY_ONCE["value"], cache_write.ENABLED["value"] = case["rotary_once"], case["cache_kernel"]
        try:
            report["cases"].append(profile_case(adapters[case["model"]], case, ceilings))
        except Exception as exc:  # report, keep profiling the other cases
            report["cases"].append({**case, "error": f"{type(exc).__name__}: {exc}"[:400]})
            print("failed", text, exc, flush=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
