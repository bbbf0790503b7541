"""ONNX Runtime CUDA on the static-KV form at LLaVA-1.5-7B widths with fewer LLM layers (a 7B export takes ~8
minutes; a few layers take one), against the torch path (CUDA graphs, no compile) of the same model in the same
process: the exported graphs and their GroupQueryAttention rewrite (apet/runtime/backends/ort_gqa.py, with the prompt
as CUDA graphs), end to end (TTFT, decode, parity with the torch reference, apet.bench.ort_path) and, with --kernels,
per phase (vision, prefill, decode step: wall and GPU-busy ms, kernel counts, scripts/ort_gpu_kernels.py). Per-layer
costs scale to the 32 layers of the full model; the vision tower is full depth.

    python scripts/ort_gqa_gpu.py --layers 8 --out ort_gqa_gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _kernels_module():
    spec = importlib.util.spec_from_file_location("ort_gpu_kernels", ROOT / "scripts" / "ort_gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    from apet.adapters.llava.shapes import shallow_shapes_adapter
    from apet.atomic import write_atomic
    from apet.bench.ort_path import export_for_bench, ort_run
    from apet.bench.run import _plan
    from apet.bench.stages import ApetPath, Request, summarize_generation

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="LLM layers (Vicuna-7B has 32)")
    parser.add_argument("--vision-layers", type=int, default=24, help="CLIP layers (ViT-L/14 has 24)")
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--device", default="cuda", help="cuda; cpu (with --dtype fp32) checks the script")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--kernels", action="store_true", help="also each form's per-phase kernel profile")
    parser.add_argument("--sets", default="", help="semicolon-separated optional-rewrite sets (apet-run "
                        "--ort-rewrites) to run through GroupQueryAttention instead of the two forms")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    adapter = shallow_shapes_adapter(args.layers, args.vision_layers, dtype, args.device)
    plan = _plan(adapter, 0.11, 2)
    request = Request(batch=1, prompt_tokens=40, new_tokens=32)
    kernels = _kernels_module()
    report: dict = {"config": {**vars(args), "out": str(args.out)}, "forms": {}}
    with tempfile.TemporaryDirectory(prefix="apet-gqa-") as scratch:
        artifact, export_s = export_for_bench(adapter, plan, Path(scratch) / "art", 1, args.max_context, "op",
                                              "static")
        report["export_s"] = round(export_s, 1)
        path = ApetPath(adapter, plan, request, graphs=args.device == "cuda", compile=False,
                        max_context=args.max_context)
        path.generate()  # warm-up and capture
        torch_run = summarize_generation([path.generate()[1] for _ in range(10)])
        del path
        report["torch"] = torch_run
        print(f"torch TTFT {torch_run['ttft']['median_ms']:.2f} ms, decode "
              f"{torch_run['decode_per_token']['median_ms']:.2f} ms")
        runs = [(f"gqa[{s}]", "gqa", s) for s in args.sets.split(";")] if args.sets else \
            [("graph", "graph", "default"), ("gqa", "gqa", "default")]
        for name, form, rewrites in runs:
            run = ort_run(adapter, plan, request, args.max_context, 10, attention="op", kv_cache="static",
                          artifact=artifact, decode_attention=form, rewrites=rewrites)
            report["forms"][name] = {"run": run}
            if args.kernels:
                report["forms"][name]["phases"] = kernels.run(artifact, True, 5, 16, form, rewrites)["phases"]
            ttft, decode = run["ttft"]["median_ms"], run["decode_per_token"]["median_ms"]
            print(f"{name:12s} TTFT {ttft:.2f} ms ({ttft / torch_run['ttft']['median_ms']:.2f}x torch), decode "
                  f"{decode:.2f} ms ({decode / torch_run['decode_per_token']['median_ms']:.2f}x), prompt graph "
                  f"{run['prompt_cuda_graph']}, greedy {run['parity']['greedy_equal_steps']}/32 vs torch")
    write_atomic(args.out, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
