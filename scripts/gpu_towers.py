"""The vision towers' GPU fast path (apet.modeling.fast_path), checked and timed on one CUDA device in one process
(run by hand on a CUDA machine; scripts/device_run.sh towers):

  python scripts/gpu_towers.py --out towers.json [--towers qwen25,qwen3,llava,next] [--no-parity]

* parity: on the tiny Qwen2.5-VL (odd grids: partial edge windows, batch 2), Qwen3-VL and LLaVA checkpoints, the
  whole vision graph (tower -> ApET stage 1 -> projector) with the fast path against the graph form on the same
  GPU (fp16 and fp32: kept indices equal, largest difference of the visual tokens against their scale), and the
  fast tower in fp32 on CUDA against the CPU's graph form;
* timing: each tower at full size (random weights), the fast path off ("before", APET_FAST_TOWERS=0's form) and on
  ("after"), captured as one CUDA graph as the bench does, with and without torch.compile where listed: median ms,
  the bench's FLOP/byte floor of the tower on this device's measured ceilings, ms over floor, warm-up seconds
  (compile + warm-up runs + capture) and the top CUDA kernels of one replay.

Results are written to --out after every tower, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_variants import profile_top  # noqa: E402

from apet.bench import flops  # noqa: E402
from apet.bench.run import measure_ceilings, shapes_of  # noqa: E402
from apet.bench.stages import Request, synthetic_request  # noqa: E402
from apet.bench.timing import time_call  # noqa: E402
from apet.compression import selector  # noqa: E402
from apet.contracts.plan import Budget, plan_for  # noqa: E402
from apet.modeling.fast_path import FAST_TOWERS  # noqa: E402
from apet.models.registry import get_family, load_adapter  # noqa: E402
from apet.runtime.cuda_graphs import GraphedCall  # noqa: E402

log = logging.getLogger("gpu_towers")
DEVICE = "cuda"  # --device cpu: a smoke test of the script itself (tiny models, no graphs, no profile)
# (model, image size (width, height), compiled variants to time): the table
TOWERS = {"qwen25": ("qwen2.5-vl-7b-shapes", (1344, 1344), (False, True)),
          "qwen3": ("qwen3-vl-8b-shapes", (1024, 1024), (False,)),
          "llava": ("llava-shapes", (336, 336), (True, False)),
          "next": ("llava-next-shapes", (672, 672), (False,))}


def _plan(adapter: Any, ratio: float):
    return plan_for(adapter.spec, get_family(adapter.family), Budget(ratio=ratio, stages=1), clamp_stages=True)


def _stages(adapter: Any, ratio: float = 0.3):
    return get_family(adapter.family).vision_stages(adapter, selector(_plan(adapter, ratio).stage1)).eval()


def _with_fast(fast: bool, fn: Callable[[], Any]) -> Any:
    saved = dict(FAST_TOWERS)
    FAST_TOWERS["enabled"] = fast
    try:
        with torch.no_grad():
            return fn()
    finally:
        FAST_TOWERS.update(saved)


def _compare(graph: dict[str, torch.Tensor], fast: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {"keep_index_equal": bool(torch.equal(graph["keep_index"].cpu(), fast["keep_index"].cpu()))}
    for name in graph:
        if name == "keep_index":
            continue
        a, b = graph[name].float().cpu(), fast[name].float().cpu()
        same = a.shape == b.shape
        out[f"{name}_max_abs_diff"] = float((a - b).abs().max()) if same else f"shapes {a.shape} {b.shape}"
        out[f"{name}_scale"] = float(a.abs().max())
    return out


def _tiny_inputs(name: str, adapter: Any, device: str) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Vision inputs of the tiny model: Qwen grids with partial edge windows (rows x cols patches), a batch of
    LLaVA images."""
    torch.manual_seed(0)
    dtype = adapter.dtype
    if name in ("qwen25", "qwen3"):
        from apet.models.qwen2_5_vl.geometry import patch_positions, window_layout

        recipe = adapter.recipe() if name == "qwen3" else None
        if recipe is None:
            from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe

            recipe = QwenImageRecipe.from_json(adapter.spec.processor)
        cases = []
        grids = ((10, 14, 2), (34, 46, 1), (16, 16, 3)) if name == "qwen25" else ((10, 14, 2), (22, 26, 1), (16, 16, 3))
        for rows, cols, batch in grids:  # the tiny Qwen3-VL's budget reaches 292 merged tokens
            pixels = torch.randn(batch, rows * cols, recipe.patch_dim, device=device, dtype=dtype)
            if name == "qwen25":
                arrays = window_layout(rows, cols, recipe).arrays().values()
            else:
                arrays = [patch_positions(rows, cols, recipe.merge_size)]
            cases.append((f"{rows}x{cols}_b{batch}", (pixels, *(torch.from_numpy(a).to(device) for a in arrays))))
        return cases
    recipe = adapter.spec.processor
    return [("b3", (torch.randn(3, 3, recipe["crop_height"], recipe["crop_width"], device=device, dtype=dtype),))]


def parity(root: Path) -> dict[str, Any]:
    from apet.adapters.llava.adapter import LlavaAdapter
    from apet.adapters.llava.tiny import create_tiny_llava
    from apet.adapters.qwen2_5_vl.adapter import QwenAdapter
    from apet.adapters.qwen2_5_vl.tiny import create_tiny_qwen
    from apet.adapters.qwen3_vl.adapter import Qwen3Adapter
    from apet.adapters.qwen3_vl.tiny import create_tiny_qwen3

    report: dict[str, Any] = {}
    for name, create, cls in (("qwen25", create_tiny_qwen, QwenAdapter), ("qwen3", create_tiny_qwen3, Qwen3Adapter),
                              ("llava", create_tiny_llava, LlavaAdapter)):
        checkpoint = create(root / name)
        cpu = cls.load(checkpoint)
        cpu_stages = _stages(cpu)
        for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            adapter = cls.load(checkpoint, dtype=dtype, device=DEVICE)
            stages = _stages(adapter)
            for case, inputs in _tiny_inputs(name, adapter, DEVICE):
                key = f"{name}/{dtype_name}/{case}"
                try:
                    graph = _with_fast(False, lambda: stages.named(stages(*inputs)))
                    fast = _with_fast(True, lambda: stages.named(stages(*inputs)))
                    report[key] = _compare(graph, fast)
                    if dtype_name == "fp32":  # the fast tower on CUDA against the CPU's graph form
                        host = tuple(t.cpu() for t in inputs)
                        want = _with_fast(False, lambda: cpu_stages.vision(*host))
                        got = _with_fast(True, lambda: stages.vision(*inputs)).cpu()
                        report[key]["tower_vs_cpu_max_abs_diff"] = float((want - got).abs().max())
                        report[key]["tower_vs_cpu_scale"] = float(want.abs().max())
                except Exception as exc:  # report, do not stop the other checks
                    report[key] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                    traceback.print_exc()
                log.info("%s: %s", key, report[key])
            _empty_cache()
    return report


def _empty_cache() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _vision_inputs(adapter: Any, stages: Any, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    _, inputs, _ = synthetic_request(adapter, _plan(adapter, 1.0), Request(1, 40, 16, image_size), 4096)
    out = {}
    for name in stages.input_names:
        tensor = torch.from_numpy(np.ascontiguousarray(inputs.arrays[name])).to(adapter.device)
        out[name] = tensor.to(adapter.dtype) if tensor.is_floating_point() else tensor
    return out


def time_tower(key: str, model: str, image_size: tuple[int, int], compiled: tuple[bool, ...],
               ceilings: dict[str, float], repeats: int, report: dict[str, Any],
               save: Callable[[], None], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Fills ``report`` variant by variant, calling ``save`` after each (a run cut short keeps them)."""
    t0 = time.perf_counter()
    adapter = load_adapter(model, dtype=torch.float16 if DEVICE == "cuda" else torch.float32, device=DEVICE)
    stages = _stages(adapter, 1.0)
    stages.prepare_fast()  # as apet-bench and the static torch backend do on a GPU
    inputs = _vision_inputs(adapter, stages, image_size)
    names = stages.input_names
    views = int(next(iter(inputs.values())).shape[0])
    vision_shape, _ = shapes_of(adapter, image_size)
    cost = flops.vision_cost(vision_shape, views)
    floor = cost.floor_ms(ceilings["matmul_tflops"], ceilings["bandwidth_gbs"])
    report.update({"model": model, "image_size": list(image_size), "views": views,
                   "tokens_per_view": vision_shape.tokens, "load_s": round(time.perf_counter() - t0, 1),
                   "floor_ms": round(floor, 4), "cost": cost.to_json(),
                   "input_shapes": {k: list(v.shape) for k, v in inputs.items()}})
    outputs: dict[bool, torch.Tensor] = {}

    def vision(**kw: torch.Tensor) -> torch.Tensor:
        return stages.vision(*(kw[n] for n in names))

    for compile_ in compiled:
        for fast in (False, True):
            label = f"{'compile' if compile_ else 'graph'}_{'after' if fast else 'before'}"
            if f"{key}:{label}" in skip:
                continue
            try:
                torch._dynamo.reset()
                FAST_TOWERS["enabled"] = fast
                fn = torch.compile(vision, dynamic=False) if compile_ else vision
                _empty_cache()
                start = time.perf_counter()
                with torch.no_grad():
                    call = GraphedCall(fn, inputs)
                    out = call(**inputs).clone()
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                warmup = time.perf_counter() - start
                with torch.no_grad():
                    timing = time_call(lambda: call(**inputs), device=DEVICE, warmup=3, repeats=repeats)
                    kernels = profile_top(lambda: call(**inputs), count=10) if DEVICE == "cuda" else []
                outputs.setdefault(fast, out)
                report[label] = {"median_ms": round(timing.median_ms, 3), "p90_ms": round(timing.p90_ms, 3),
                                 "over_floor": round(timing.median_ms / floor, 2), "warmup_s": round(warmup, 1),
                                 "top_kernels": kernels}
            except Exception as exc:  # report, keep timing the other variants
                report[label] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
                traceback.print_exc()
            finally:
                FAST_TOWERS["enabled"] = True
            log.info("%s %s: %s", key, label, {k: v for k, v in report[label].items() if k != "top_kernels"})
            _empty_cache()
            save()
    if len(outputs) == 2:  # random full-size weights: the fast path against the graph form in fp16
        a, b = outputs[False].float(), outputs[True].float()
        report["after_vs_before"] = {"max_abs_diff": float((a - b).abs().max()), "scale": float(a.abs().max()),
                                     "mean_abs_diff": float((a - b).abs().mean())}
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--towers", default=",".join(TOWERS), help=f"any of {', '.join(TOWERS)}")
    parser.add_argument("--no-parity", action="store_true", help="skip the tiny-model checks")
    parser.add_argument("--skip", default="", help="variants not to time, e.g. llava:compile_before,next:graph_before "
                        "(a 'before' already profiled by scripts/gpu_profile.py in docs/benchmarks/h200-floor)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (with --models tiny)")
    parser.add_argument("--models", default="", help="tiny: time the tiny checkpoints' towers instead")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    FAST_TOWERS["off_cuda"] = DEVICE != "cuda"  # the smoke test runs the fast path's CPU form
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
                              "torch": torch.__version__}
    save = lambda: args.out.write_text(json.dumps(report, indent=1))  # noqa: E731
    if not args.no_parity:
        report["parity"] = parity(Path(tempfile.mkdtemp()))
        save()
    report["ceilings"] = measure_ceilings(torch.device(DEVICE), torch.float16 if DEVICE == "cuda" else torch.float32)
    tiny = {"qwen25": "tiny-qwen2.5-vl", "qwen3": "tiny-qwen3-vl", "llava": "tiny", "next": "tiny-llava-next"}
    for key in args.towers.split(","):
        model, size, compiled = TOWERS[key]
        if args.models == "tiny":
            model, compiled = tiny[key], (False,)
        report[key] = {}
        time_tower(key, model, size, compiled, report["ceilings"], args.repeats, report[key], save,
                   frozenset(filter(None, args.skip.split(","))))
        _empty_cache()  # the tower's weights and graphs go before the next one loads
        save()
    summary = {k: {label: (v.get("median_ms"), v.get("over_floor"), v.get("warmup_s")) if isinstance(v, dict) and
                   "top_kernels" in v else v for label, v in report[k].items()
                   if label.startswith(("graph", "compile", "floor", "after_vs"))}
               for k in args.towers.split(",")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
