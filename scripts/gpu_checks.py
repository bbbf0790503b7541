"""GPU checks (run by hand on a CUDA machine): the CUDA-graph torch path and ONNX Runtime (CPU, and CUDA where
onnxruntime-gpu is installed) give the same tokens as the HF-module reference on the tiny model, in fp32 and
fp16; writes a JSON summary.

  python scripts/gpu_checks.py --out gpu_checks.json [--attention op] [--dtypes fp32,fp16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from conftest import make_image

    from apet.adapters.llava.adapter import LlavaAdapter
    from apet.adapters.llava.tiny import create_tiny_llava
    from apet.export.artifact import ExportConfig, export_artifact
    from apet.runtime.pipeline import Pipeline
    from apet.runtime.sampling import GenerationConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attention", choices=("pattern", "op"), default="pattern",
                        help="form of the exported graphs that ONNX Runtime runs")
    parser.add_argument("--dtypes", default="fp32,fp16")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    checkpoint = create_tiny_llava(root / "tiny")
    images = [make_image(1, (300, 200)), make_image(2, (180, 260))]
    prompts = ["What is in the picture?", "How many objects are there and what color are they?"]
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "attention": args.attention}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    for dtype_name in args.dtypes.split(","):
        dtype = dtypes[dtype_name]
        artifact = root / f"artifact_{dtype_name}"
        export_artifact(ExportConfig(model=str(checkpoint), out=artifact, ratio=0.11, dtype=dtype_name,
                                     attention=args.attention))
        adapter = LlavaAdapter.load(checkpoint, dtype=dtype, device="cuda")
        pipelines = {
            "reference_cuda": Pipeline.load(artifact, backend="torch", device="cuda", adapter=adapter,
                                            torch_mode="reference"),
            "static_graphs_cuda": Pipeline.load(artifact, backend="torch", device="cuda", adapter=adapter,
                                                torch_mode="static"),
            "onnxruntime_cpu": Pipeline.load(artifact, backend="onnxruntime", device="cpu"),
        }
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pipelines["onnxruntime_cuda"] = Pipeline.load(artifact, backend="onnxruntime", device="cuda")
        tokens = {}
        for name, pipeline in pipelines.items():
            for batch in (1, 2):
                t0 = time.perf_counter()
                results = pipeline.generate_batch(images[:batch], prompts[:batch], GenerationConfig(max_new_tokens=24))
                tokens[(name, batch)] = [r.token_ids for r in results]
                report[f"{dtype_name}/{name}/b{batch}_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        for batch in (1, 2):
            ref = tokens[("reference_cuda", batch)]
            for name in [n for n in pipelines if n != "reference_cuda"]:
                got = tokens[(name, batch)]
                same = [int(np.sum(np.array(a[:len(b)]) == np.array(b[:len(a)]))) for a, b in zip(got, ref)]
                report[f"{dtype_name}/b{batch}/{name}_equal"] = got == ref
                report[f"{dtype_name}/b{batch}/{name}_matching_tokens"] = same
        del adapter, pipelines
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
