"""ONNX Runtime CUDA's GroupQueryAttention decode and CUDA-graph vision against the exported graphs, on a tiny fp16
artifact (static KV, op attention, ApET's two stages): greedy tokens, the largest logit difference per step and
which path ran, batch 1 (GroupQueryAttention) and batch 2 with left padding (the exported graph). The CPU tests
(tests/test_ort_gqa.py) check the same with ONNX Runtime's CPU kernels; this runs the CUDA ones.

    python scripts/ort_gqa_check.py --out ort_gqa_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from apet.atomic import write_atomic  # noqa: E402


def main() -> int:
    from conftest import make_image
    from test_static_kv import _greedy as greedy  # the tests' prefill + greedy decode through a backend

    from apet.export.artifact import ExportConfig, export_artifact
    from apet.runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cuda", help="cuda; cpu checks the script (fp32: CPU has no fp16 here)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    images = [make_image(1, (300, 200)), make_image(2, (180, 260))]
    prompts = ["What is in the picture?", "How many objects are there and what color are they?"]
    result = {}
    with tempfile.TemporaryDirectory() as scratch:
        artifact = Path(scratch) / "tiny"
        export_artifact(ExportConfig(model="tiny", out=artifact, ratio=0.11, stages=2, attention="op",
                                     kv_cache="static",
                                     dtype="fp16" if args.device == "cuda" else "fp32", max_batch=2, max_context=256,
                                     device=args.device))
        for batch in (1, 2):
            runs = {}
            for form in ("gqa", "graph"):
                pipeline = Pipeline.load(artifact, backend="onnxruntime", device=args.device,
                                         decode_attention=form)
                runs[form] = greedy(pipeline, images[:batch], prompts[:batch], args.steps)
                static = pipeline.backend.static
                runs[form]["paths"] = {"decode": sorted(str(k) for k in static.steps),
                                       "prefill_rewritten": static.gqa_prompt is not None
                                       and static.exported_prefill is None,
                                       "vision_cuda_graph": pipeline.backend.vision_graphed()}
            gqa, graph = runs["gqa"], runs["graph"]
            diffs = np.abs(gqa["logits"] - graph["logits"]).max(axis=(1, 2))
            result[f"batch{batch}"] = {
                "paths": {form: run["paths"] for form, run in runs.items()},
                "keep_equal": bool(np.array_equal(gqa["keep"], graph["keep"])),
                "greedy_equal_steps": sum(a == b for a, b in zip(gqa["tokens"], graph["tokens"])),
                "steps": args.steps, "max_abs_logit_diff_by_step": [round(float(d), 5) for d in diffs],
                "logit_scale": round(float(np.abs(graph["logits"]).max()), 3)}
            print(f"batch {batch}: {json.dumps(result[f'batch{batch}'])}")
    write_atomic(args.out, json.dumps(result, indent=1).encode())
    first = result["batch1"]  # the rewritten graphs must agree with the exported ones before any timing is trusted
    agree = first["keep_equal"] and first["max_abs_logit_diff_by_step"][0] <= 0.02 * first["logit_scale"] and \
        first["paths"]["gqa"]["prefill_rewritten"]
    print("rewritten graphs agree with the exported ones" if agree else "REWRITTEN GRAPHS DISAGREE")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
