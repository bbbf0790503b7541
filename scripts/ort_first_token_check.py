"""ONNX Runtime CUDA's first-token graph (apet/runtime/backends/ort_first_token.py) against the two sessions it
replaces, on a tiny fp16 artifact (static KV, op attention, ApET's two stages, LLaVA-1.5): kept and stage-2 indices,
visual rows, logits and greedy tokens, batch 1 and 2, the rewrites of ``--rewrites`` with and without
``first-token``. Batch 1 then runs three more times on the same pipeline: the first-token graph's CUDA graph is
bound, captured and replayed, and each run must equal the first. The CPU tests (tests/test_ort_first_token.py) check
the same with ONNX Runtime's CPU kernels, bit for bit; this runs the CUDA ones (the vision part in the graphed
session's form: token layout, the device's cast, ``MatMulAddFusion`` left out for the whole graph).

    python scripts/ort_first_token_check.py --out ort_first_token_check.json
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


def _compare(one: dict, two: dict) -> dict:
    return {"greedy_equal_steps": sum(a == b for a, b in zip(one["tokens"], two["tokens"])),
            "steps": len(two["tokens"]),
            **{f"{key}_equal": bool(np.array_equal(one[key], two[key])) for key in ("keep", "stage2", "embeds")},
            "max_abs_embeds_diff": float(np.abs(one["embeds"].astype(np.float32) - two["embeds"]).max()),
            "max_abs_logit_diff": float(np.abs(one["logits"] - two["logits"]).max()),
            "logit_scale": round(float(np.abs(two["logits"]).max()), 3),
            "one_run": one["vision_ms"] == 0.0}


def main() -> int:
    from conftest import make_image
    from test_ort_first_token import _first_tokens  # the first token through Backend.first_token, then greedy

    from apet.export.artifact import ExportConfig, export_artifact
    from apet.runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cuda", help="cuda; cpu checks the script (fp32: CPU has no fp16 here)")
    parser.add_argument("--rewrites", default="default", help="the rewrites besides first-token (apet-run "
                        "--ort-rewrites)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    images = [make_image(1, (300, 200)), make_image(2, (180, 260))]
    prompts = ["What is in the picture?"] * 2  # one length: no left padding (a padded batch runs apart)
    result: dict = {"rewrites": args.rewrites}
    with tempfile.TemporaryDirectory() as scratch:
        artifact = Path(scratch) / "tiny"
        export_artifact(ExportConfig(model="tiny", out=artifact, ratio=0.11, stages=2, attention="op",
                                     kv_cache="static", dtype="fp16" if args.device == "cuda" else "fp32",
                                     max_batch=2, max_context=256, device=args.device))
        load = lambda rewrites: Pipeline.load(artifact, backend="onnxruntime", device=args.device,  # noqa: E731
                                              ort_rewrites=rewrites)
        one, two = load(f"{args.rewrites},first-token"), load(args.rewrites)
        for batch in (1, 2):
            runs = [_first_tokens(p, images[:batch], prompts[:batch], args.steps) for p in (one, two)]
            result[f"batch{batch}"] = _compare(*runs)
            print(f"batch {batch}: {json.dumps(result[f'batch{batch}'])}")
        first = _first_tokens(one, images[:1], prompts[:1], args.steps)
        repeats = [_first_tokens(one, images[:1], prompts[:1], args.steps) for _ in range(3)]
        graphs = one.backend.static.first.graphs
        result["graphs"] = {
            "enabled": graphs is not None,
            "bound_shapes": 0 if graphs is None else len(graphs.runs),
            "failed_shapes": 0 if graphs is None else sum(run is None for run in graphs.runs.values()),
            "repeats_equal": all(run["tokens"] == first["tokens"] and np.array_equal(run["logits"], first["logits"])
                                 for run in repeats)}
        print(f"graphs: {json.dumps(result['graphs'])}")
    write_atomic(args.out, json.dumps(result, indent=1).encode())
    agree = all(result[f"batch{b}"]["keep_equal"] and result[f"batch{b}"]["one_run"] for b in (1, 2)) and \
        result["graphs"]["repeats_equal"]
    print("the first-token graph agrees with the two sessions" if agree else "FIRST-TOKEN GRAPH DISAGREES")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
