"""The two attention forms side by side in ONNX Runtime, on one set of weights and inputs (run by hand; a CUDA
machine with onnxruntime-gpu for the CUDA execution provider).

LLaVA-1.5-7B widths (CLIP ViT-L/14-336, Vicuna-7B layers) with fewer layers, so both forms export in seconds:
each form's kept indices, greedy tokens and per-step |Δlogit| against the torch path, and the two forms' greedy
tokens against each other. ``--ratio 1.0 --stages 1`` keeps every token, so no selection or merge near-tie can
flip between runtimes and what is left is the kernels' rounding. Full depth works too (``--layers 32
--vision-layers 24``) but takes ~5 minutes of export per form.

  python scripts/attention_forms_gpu.py --out forms.json [--layers 4] [--vision-layers 4] [--dtype fp16]
                                        [--ratio 1.0 --stages 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from apet.adapters.llava.shapes import shallow_shapes_adapter
    from apet.bench.ort_path import ort_run
    from apet.bench.run import _plan
    from apet.bench.stages import Request

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Vicuna-7B has 32)")
    parser.add_argument("--vision-layers", type=int, default=4, help="CLIP layers (ViT-L/14 has 24)")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--ratio", type=float, default=0.11)
    parser.add_argument("--stages", type=int, choices=(1, 2), default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--forms", default="pattern,op", help="one form per call at full depth (export ~5 min each)")
    args = parser.parse_args()

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    adapter = shallow_shapes_adapter(args.layers, args.vision_layers, dtype, args.device)
    plan = _plan(adapter, args.ratio, args.stages)
    request = Request(batch=1, prompt_tokens=40, new_tokens=args.steps)
    max_context = 40 + adapter.spec.n_tokens + args.steps + 64
    report: dict = {"config": vars(args) | {"out": str(args.out)}, "forms": {}}
    for form in args.forms.split(","):
        result = ort_run(adapter, plan, request, max_context, repeats=3, parity_steps=args.steps, attention=form)
        report["forms"][form] = result
        parity = result["parity"]
        print(f"{form:8s} stage-1 equal {parity['stage1_index_equal']}, stage-2 equal {parity['stage2_index_equal']}"
              f", greedy {parity['greedy_equal_steps']}/{parity['greedy_steps']} vs torch, max |Δlogit| "
              f"{parity['max_abs_logit_diff']} (scale {parity['logit_scale']}), TTFT {result['ttft']['median_ms']} "
              f"ms, decode {result['decode_per_token']['median_ms']} ms")
    if {"pattern", "op"} <= report["forms"].keys():
        a, b = (report["forms"][f]["greedy_tokens"] for f in ("pattern", "op"))
        report["op_vs_pattern_equal_steps"] = sum(x == y for x, y in zip(a, b))
        print(f"op vs pattern: {report['op_vs_pattern_equal_steps']}/{len(a)} greedy steps equal")
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
