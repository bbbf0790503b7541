"""ONNX Runtime CUDA's GroupQueryAttention decode and CUDA-graph vision against the exported graphs, on a tiny fp16
artifact (static KV, op attention, ApET's two stages): greedy tokens, the largest logit difference per step and
which path ran, batch 1 (GroupQueryAttention) and batch 2 with left padding (the exported graph). Batch 1 then runs
three more times on the same pipeline: the prompt's CUDA graph (apet/runtime/backends/ort_prompt_graphs.py) is bound,
captured and replayed, and each run must equal the first. Where ONNX Runtime refuses CUDA graphs for the prefill, the
nodes it copies between host and device are listed (optimized graph). The CPU tests
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
    parser.add_argument("--rewrites", default="default", help="the optional rewrites (apet-run --ort-rewrites)")
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
                                         decode_attention=form, ort_rewrites=args.rewrites)
                runs[form] = greedy(pipeline, images[:batch], prompts[:batch], args.steps)
                if form == "gqa":
                    gqa_pipeline = pipeline
                static = pipeline.backend.static
                runs[form]["paths"] = {"decode": sorted(str(k) for k in static.steps),
                                       "prefill_rewritten": static.gqa_prompt is not None
                                       and static.exported_prefill is None,
                                       "vision_cuda_graph": pipeline.backend.vision_graphed()}
            if batch == 1:
                result["prompt_graphs"] = _prompt_graphs(gqa_pipeline, runs["gqa"], images[:1], prompts[:1],
                                                         args.steps, greedy)
                print(f"prompt graphs: {json.dumps(result['prompt_graphs'])}")
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
        first["paths"]["gqa"]["prefill_rewritten"] and result["prompt_graphs"]["repeats_equal"]
    print("rewritten graphs agree with the exported ones" if agree else "REWRITTEN GRAPHS DISAGREE")
    return 0 if agree else 1


def _prompt_graphs(pipeline, first: dict, images: list, prompts: list, steps: int, greedy) -> dict:
    """Three more prefills of the same prompt (bound, captured, replayed), each against the first run."""
    static = pipeline.backend.static
    repeats = [greedy(pipeline, images, prompts, steps) for _ in range(3)]
    equal = [run["tokens"] == first["tokens"] and bool(np.array_equal(run["logits"], first["logits"]))
             for run in repeats]
    report = {"enabled": static.prompt_graphs is not None, "repeats_equal": all(equal), "each": equal,
              "max_abs_logit_diff": [float(np.abs(run["logits"] - first["logits"]).max()) for run in repeats]}
    if static.prompt_graphs is not None:
        report["bound_shapes"] = len(static.prompt_graphs.runs)
        report["failed_shapes"] = sum(run is None for run in static.prompt_graphs.runs.values())
    elif pipeline.backend.device_type == "cuda":
        report["memcpy_nodes"] = _memcpy_nodes(static)
    return report


def _memcpy_nodes(static) -> list[str]:
    """Where ONNX Runtime copies between host and device in the rewritten prefill (why it refused CUDA graphs)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(static.weights_dir))
        ort.InferenceSession(static.gqa_prompt.model.SerializeToString(), options,
                             providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type.startswith("Memcpy"):
            source = producers.get(node.input[0])
            found.append(f"{node.op_type}: {source.op_type + ' ' + source.name if source else node.input[0]} -> "
                         + ", ".join(f"{c.op_type} {c.name}" for c in consumers.get(node.output[0], [])))
    return found


if __name__ == "__main__":
    sys.exit(main())
