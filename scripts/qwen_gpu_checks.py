"""Qwen2.5-VL GPU checks (run by hand on a CUDA machine; the CPU tests cannot execute engines): on the tiny
checkpoint, TensorRT engines (per-image K from a shape computation, dynamic vision outputs, M-RoPE LLM), the
CUDA-graph static torch path and ONNX Runtime give the same greedy tokens and kept indices as the HF-module
reference, for batches of 1, 2 and 4 mixed-size images; writes a JSON summary.

  python scripts/qwen_gpu_checks.py --out qwen_gpu_checks.json [--builder tensorrt|tensorrt-rtx|none]

``--builder none`` skips the engines (GPUs TensorRT-RTX refuses, such as the H100, with no full TensorRT);
ONNX Runtime's CUDA execution provider joins the comparison where it is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from conftest import make_image

    from apet.adapters.qwen2_5_vl.adapter import QwenAdapter
    from apet.adapters.qwen2_5_vl.tiny import create_tiny_qwen
    from apet.engines.build import BuildConfig, build_artifact
    from apet.export.artifact import ExportConfig, export_artifact
    from apet.runtime.pipeline import Pipeline
    from apet.runtime.sampling import GenerationConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--builder", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx", "none"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    checkpoint = create_tiny_qwen(root / "tiny")
    images = [make_image(1, (300, 200)), make_image(2, (180, 260)), make_image(3, (420, 140)),
              make_image(4, (300, 200))]
    prompts = ["What is in the picture?", "How many objects are there and what color are they?",
               "Describe the image.", "What colors do you see?"]
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        for budget in ({"ratio": 0.3}, {"tokens": "300"}):
            tag = f"{dtype_name}/{'ratio0.3' if 'ratio' in budget else 'tokens300'}"
            artifact = root / tag.replace("/", "_")
            export_artifact(ExportConfig(model=str(checkpoint), out=artifact, dtype=dtype_name, **budget))
            pipelines = {"reference": ("torch", dict(device="cuda", torch_mode="reference")),
                         "static_graphs": ("torch", dict(device="cuda", torch_mode="static")),
                         "onnxruntime_cpu": ("onnxruntime", dict(device="cpu"))}
            import onnxruntime

            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                pipelines["onnxruntime_cuda"] = ("onnxruntime", dict(device="cuda"))
            if dtype_name == "fp16" and args.builder != "none":
                build_artifact(BuildConfig(artifact=artifact, backend=args.builder, compute_capabilities=()))
                pipelines["tensorrt"] = ("tensorrt", dict(device="cuda"))
            adapter = QwenAdapter.load(checkpoint, dtype=dtype, device="cuda")
            results = {}
            for name, (backend, options) in pipelines.items():
                extra = {"adapter": adapter} if backend == "torch" else {}
                pipeline = Pipeline.load(artifact, backend=backend, **options, **extra)
                for batch in (1, 2, 4):
                    t0 = time.perf_counter()
                    out = pipeline.generate_batch(images[:batch], prompts[:batch], GenerationConfig(max_new_tokens=24))
                    results[(name, batch)] = ([r.token_ids for r in out], [r.keep_index for r in out])
                    report[f"{tag}/{name}/b{batch}_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            for batch in (1, 2, 4):
                want_tokens, want_kept = results[("reference", batch)]
                for name in pipelines:
                    got_tokens, got_kept = results[(name, batch)]
                    report[f"{tag}/b{batch}/{name}_tokens_equal"] = got_tokens == want_tokens
                    report[f"{tag}/b{batch}/{name}_kept_equal"] = got_kept == want_kept
            del adapter
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
