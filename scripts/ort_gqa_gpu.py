"""ONNX Runtime CUDA on the static-KV form at LLaVA-1.5-7B widths with fewer LLM layers (a 7B export takes ~8
minutes; a few layers take one): the exported graphs against their GroupQueryAttention rewrite
(apet/runtime/backends/ort_gqa.py), per phase (vision, prefill, decode step: wall and GPU-busy ms, kernel counts,
scripts/ort_gpu_kernels.py) and end to end (TTFT, decode, parity with the torch reference, apet.bench.ort_path).
Per-layer costs scale to the 32 layers of the full model; the vision tower is full depth.

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
    from apet.bench.stages import Request

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="LLM layers (Vicuna-7B has 32)")
    parser.add_argument("--vision-layers", type=int, default=24, help="CLIP layers (ViT-L/14 has 24)")
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--device", default="cuda", help="cuda; cpu (with --dtype fp32) checks the script")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
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
        for form in ("graph", "gqa"):
            phases = kernels.run(artifact, True, 5, 16, form)
            run = ort_run(adapter, plan, request, args.max_context, 10, attention="op", kv_cache="static",
                          artifact=artifact, decode_attention=form)
            report["forms"][form] = {"phases": phases["phases"], "run": run}
            walls = {name: phase["wall_ms_median"] for name, phase in phases["phases"].items()}
            print(f"{form:5s} TTFT {run['ttft']['median_ms']:.2f} ms, decode {run['decode_per_token']['median_ms']:.2f}"
                  f" ms, phases (profiled wall) {walls}, greedy {run['parity']['greedy_equal_steps']}/32 vs torch")
    write_atomic(args.out, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
