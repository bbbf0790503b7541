"""Prefill, decode and ApET's stages against their floors, old vs new kernels, on one CUDA device (issue 31; run by
hand or through ``scripts/device_run.sh floor``). Writes one JSON.

  python scripts/gpu_floor.py --out floor.json [--compile] [--skip tokens,apet,llava,next]

* ``tokens``: greedy tokens of the tiny LLaVA / Qwen2.5-VL / InternVL static path (new kernels: packed FlashAttention
  prefill, ApET stage kernels, fused norms and rotary) and of the static path with all of them off, each against the
  HF-module reference path on the GPU (fp16), batch 1 and 2;
* ``apet``: one ApET stage as a CUDA graph, LLaVA-1.5 shapes (stage 1: N=576 D=1024 keep 96 ``mask``; stage 2: N=96
  D=4096 keep 32 ``rank``), batch 1 and 4: the torch-op path (old) vs :mod:`apet.kernels.apet_stage` (new); kept
  indices of both against the float64 oracle; the new path's top kernels;
* ``llava``: llava-shapes at 0.11 (136-token prefill, two stages), batch 1 and 4: prefill, decode step and both ApET
  stages in the pipeline, old (masked SDPA prefill, HF norms and torch rotary, torch-op ApET) vs new, each against
  its floor (apet.bench.flops, measured ceilings), the top CUDA kernels of prefill and decode;
* ``next``: llava-next-shapes at ratio 1.0 (~2,968-token prefill), batch 1: prefill old vs new against its floor.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))


@contextlib.contextmanager
def variant(new: bool) -> Iterator[None]:
    """The new kernels (default) or every one of them off: torch-op ApET, HF norms and torch rotary, cuBLAS for
    every matmul. (The prefill's
    attention form is the decoder's own switch, ``prefill_attention``.) Switches are read when a graph is captured."""
    from apet.compression import FUSED
    from apet.kernels import gemv
    from apet.runtime.fusion import KERNELS

    saved = dict(FUSED), dict(KERNELS), dict(gemv.ENABLED)
    FUSED["stage_kernel"] = new
    KERNELS["enabled"] = new
    gemv.ENABLED["value"] = new  # decode's skinny matmuls: the measured choice of kernel vs cuBLAS only
    try:
        yield
    finally:
        FUSED.update(saved[0])
        KERNELS.update(saved[1])
        gemv.ENABLED.update(saved[2])


def form(new: bool) -> str:
    return "auto" if new else "masked"


def export_tiny(root: Path, name: str, create: Any, budget: dict[str, Any]) -> tuple[Path, Any]:
    """A tiny checkpoint of one family exported in fp16 at ``budget``, and its fp16 adapter on the GPU."""
    from apet.export.artifact import ExportConfig, export_artifact
    from apet.models.registry import load_adapter

    checkpoint = create(root / name)
    artifact = root / f"{name}-artifact"
    export_artifact(ExportConfig(model=str(checkpoint), out=artifact, dtype="fp16", **budget))
    return artifact, load_adapter(str(checkpoint), dtype=torch.float16, device="cuda")


def tiny_requests() -> tuple[list[Any], list[str]]:
    """Two images of different sizes and two prompts: batch 1 takes the first of each."""
    from conftest import make_image

    return ([make_image(1, (300, 200)), make_image(2, (180, 260))],
            ["What is in the picture?", "How many objects are there and what color are they?"])


def tiny_generation() -> Any:
    from apet.runtime.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=24)


def matching(got: list[list[int]], want: list[list[int]]) -> list[int]:
    """Per row, how many greedy tokens equal the reference's."""
    return [int(np.sum(np.array(a[:len(b)]) == np.array(b[:len(a)]))) for a, b in zip(got, want)]


def tokens_check(report: dict[str, Any]) -> None:
    from apet.adapters.internvl.tiny import create_tiny_internvl
    from apet.adapters.llava.tiny import create_tiny_llava
    from apet.adapters.qwen2_5_vl.tiny import create_tiny_qwen
    from apet.runtime.pipeline import Pipeline

    root = Path(tempfile.mkdtemp())
    images, prompts = tiny_requests()
    families = {"llava": (create_tiny_llava, {"ratio": 0.11}), "qwen2.5-vl": (create_tiny_qwen, {"ratio": 0.3}),
                "internvl": (create_tiny_internvl, {"ratio": 0.25})}
    out: dict[str, Any] = {}
    config = tiny_generation()
    for name, (create, budget) in families.items():
        artifact, adapter = export_tiny(root, name, create, budget)
        reference = Pipeline.load(artifact, backend="torch", device="cuda", adapter=adapter, torch_mode="reference")
        with variant(False):  # the reference: HF modules, ApET in the torch ops the CPU tests check
            wants = {batch: [r.token_ids for r in reference.generate_batch(images[:batch], prompts[:batch], config)]
                     for batch in (1, 2)}
        results: dict[str, Any] = {}
        for new in (True, False):
            with variant(new):
                static = Pipeline.load(artifact, backend="torch", device="cuda", adapter=adapter, torch_mode="static")
                static.backend.decoder.prefill_attention = form(new)
                for batch in (1, 2):
                    got = [r.token_ids for r in static.generate_batch(images[:batch], prompts[:batch], config)]
                    want = wants[batch]
                    same = matching(got, want)
                    key = f"{'new' if new else 'old'}/b{batch}"
                    results[key] = {"equal": got == want, "matching_tokens": same, "of": [len(w) for w in want]}
                    print(name, key, results[key], flush=True)
            del static
        out[name] = results
        del adapter, reference
        gc.collect()
        torch.cuda.empty_cache()
    report["tokens"] = out


def _oracle_index(x: torch.Tensor, keep: int, placement: str) -> np.ndarray:
    import numpy_reference as ref

    return ref.compress(x.double().cpu().numpy(), keep, 10, placement=placement)[1]


def apet_timing(report: dict[str, Any]) -> None:
    from gpu_variants import profile_top

    from apet.bench.timing import time_call
    from apet.compression import compress_with
    from apet.contracts.compression import CompressionConfig
    from apet.runtime.cuda_graphs import GraphedCall

    out: dict[str, Any] = {}
    stages = {"stage1": (576, 1024, 96, "mask"), "stage2": (96, 4096, 32, "rank")}
    for stage, (n, dim, keep, placement) in stages.items():
        config = CompressionConfig(keep=keep, basis=10, placement=placement)
        for batch in (1, 4):
            generator = torch.Generator().manual_seed(batch)
            x = (torch.randn(batch, n, dim, generator=generator) * 2).to("cuda", torch.float16)
            row: dict[str, Any] = {}
            want = _oracle_index(x, keep, placement)
            for new in (False, True):
                with variant(new):
                    call = GraphedCall(lambda t: tuple(compress_with(config, t)), {"t": x})
                    name = "new" if new else "old"
                    row[f"{name}_ms"] = round(time_call(lambda: call(t=x), device="cuda", warmup=10,
                                                        repeats=200).median_ms, 4)
                    tokens, index = call(t=x)
                    row[f"{name}_index_equals_oracle"] = bool(np.array_equal(index.cpu().numpy(), want))
                    row[f"{name}_tokens"] = tokens.float().clone()
                    if new and batch == 1:
                        row["new_top_kernels"] = profile_top(lambda: call(t=x))
            row["tokens_max_abs_diff"] = float((row.pop("new_tokens") - row.pop("old_tokens")).abs().max())
            out[f"{stage}/b{batch}"] = row
            print(stage, batch, {k: v for k, v in row.items() if "kernels" not in k}, flush=True)
    report["apet"] = out


def _floors(path: Any, adapter: Any, plan: Any, request: Any, ceilings: dict[str, float]) -> dict[str, float]:
    from apet.bench.run import stage_costs

    tokens, keep = int(path.features.shape[1]), int(path.kept[1].shape[1])
    costs, _ = stage_costs(adapter, plan.stage1, plan.stage2, request, plan.stage1.basis, tokens, keep,
                           path.visual_tokens, path.views)
    return {k: round(c.floor_ms(ceilings["matmul_tflops"], ceilings["bandwidth_gbs"]), 4) for k, c in costs.items()}


def path_timing(model: str, ratio: float, stages: int, batches: tuple[int, ...], new_tokens: int, compile: bool,
                decode: bool, max_context: int) -> dict[str, Any]:
    """Old vs new ApetPath of ``model`` per batch: stage timings, decode ms/token, floors, top kernels."""
    from gpu_variants import profile_top

    from apet.bench.run import measure_ceilings
    from apet.bench.stages import ApetPath, Request, summarize_generation
    from apet.contracts.plan import Budget, plan_for
    from apet.models.registry import get_family, load_adapter

    t0 = time.perf_counter()
    adapter = load_adapter(model, dtype=torch.float16, device="cuda")
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 1)}
    ceilings = measure_ceilings(adapter.device, adapter.dtype)
    out["ceilings"] = ceilings
    plan = plan_for(adapter.spec, get_family(adapter.family), Budget(ratio=ratio, stages=stages), clamp_stages=True)
    for batch in batches:
        request = Request(batch, 40, new_tokens)
        for new in (False, True):
            name = f"b{batch}/{'new' if new else 'old'}"
            with variant(new):
                t0 = time.perf_counter()
                path = ApetPath(adapter, plan, request, graphs=True, compile=compile, max_context=max_context,
                                prefill_attention=form(new))
                row: dict[str, Any] = {"setup_s": round(time.perf_counter() - t0, 1),
                                       "prompt_tokens": int(path.prompt_length),
                                       "prefill_attention": path.decoder.prefill_form(
                                           path.prefill_inputs["visual"], path.prompt_padding)}
                path.generate()
                stages_ms = {k: round(v.median_ms, 4) for k, v in path.stage_timings(20).items()}
                row["stages_ms"] = stages_ms
                first = path.first_token()
                row["first_token"] = first.tolist()
                if decode:
                    runs = [path.generate()[1] for _ in range(3)]
                    row["decode_ms"] = summarize_generation(runs)["decode_per_token"]["median_ms"]
                floors = _floors(path, adapter, plan, request, ceilings)
                row["floors_ms"] = floors
                measured = {**stages_ms, **({"decode_step": row["decode_ms"]} if decode else {})}
                row["over_floor"] = {k: round(measured[k] / floors[k], 3) for k in measured
                                     if floors.get(k, 0) > 0}
                if batch == batches[0]:
                    row["prefill_top_kernels"] = profile_top(lambda p=path: p.prefill(**p.prefill_inputs))
                    if decode:
                        token = torch.zeros(batch, dtype=torch.long, device="cuda")
                        position = torch.from_numpy(path.last_position + 1).cuda()
                        path.first_token()  # a fresh cache: the profiled steps write inside the span
                        row["decode_top_kernels"] = profile_top(
                            lambda p=path: p.decode(0, token=token, position=position))
                out[name] = row
                print(model, name, {k: v for k, v in row.items() if "kernels" not in k}, flush=True)
                del path
                gc.collect()
                torch.cuda.empty_cache()
                torch._dynamo.reset()
    del adapter
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile every stage (as apet-bench --compile)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: tokens, apet, llava, next")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "compile": args.compile}
    start = time.perf_counter()

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        args.out.write_text(json.dumps(report, indent=1, default=str))

    parts = [("apet", lambda: apet_timing(report)), ("tokens", lambda: tokens_check(report)),
             ("llava", lambda: report.update(llava=path_timing("llava-shapes", 0.11, 2, (1, 4), 32, args.compile,
                                                               True, 2048))),
             ("next", lambda: report.update(next=path_timing("llava-next-shapes", 1.0, 1, (1,), 4, args.compile,
                                                             False, 4096)))]
    for name, run in parts:
        if name in skip:
            continue
        try:
            run()
        except Exception as exc:  # report and go on: one failed part must not lose the others' numbers
            import traceback

            report[f"{name}_error"] = traceback.format_exc()[-3000:]
            print(f"{name} failed: {exc!r}", flush=True)
        save()
    print(json.dumps({k: v for k, v in report.items() if k in ("elapsed_s",) or k.endswith("_error")}, indent=1))


if __name__ == "__main__":
    main()
