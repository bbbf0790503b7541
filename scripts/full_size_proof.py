"""Full-size proofs (not CI): export LLaVA-1.5-7B-shaped graphs with random weights and check them.

  python scripts/full_size_proof.py vision --device cuda --out OUT/vision   [--images 16]
  python scripts/full_size_proof.py llm    --device cuda --out OUT/llm      [--prompt-tokens 24]
                                           [--weights int4|int8 [--calibration rtn|awq]]
  python scripts/full_size_proof.py build  --onnx OUT/vision/vision.onnx   (TensorRT-RTX AOT, CPU is fine)

Each writes ``proof.json`` (times, file sizes, agreement) next to the ONNX it made.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from apet.compression import selector


def _sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}


def vision(args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    from apet.contracts.compression import CompressionConfig
    from apet.contracts.onnx_graph import check_onnx
    from apet.export.vision import export_vision
    from apet.models.registry import get_family, load_adapter

    torch.manual_seed(0)
    t0 = time.perf_counter()
    adapter = load_adapter("llava-shapes", dtype=torch.float16, device=args.device)
    load_s = time.perf_counter() - t0
    config = CompressionConfig(keep=args.keep)
    path = args.out / "vision.onnx"
    t0 = time.perf_counter()
    export_vision(adapter, config, path, opset=17)
    export_s = time.perf_counter() - t0
    check_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = get_family(adapter.family).vision_stages(adapter, selector(config)).eval()
    same, overlap = 0, []
    for i in range(args.images):
        pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(i)).half()
        _, index_ort = session.run(None, {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            _, index_torch = graph(pixels.to(args.device))
        a, b = index_ort[0].tolist(), index_torch[0].cpu().tolist()
        same += a == b
        overlap.append(len(set(a) & set(b)) / len(a))
    return {"load_s": round(load_s, 1), "export_s": round(export_s, 1), "files": _sizes(args.out),
            "keep": args.keep, "images": args.images, "identical_keep_index": same,
            "mean_index_overlap": round(float(np.mean(overlap)), 4), "min_index_overlap": round(min(overlap), 4)}


def llm(args: argparse.Namespace) -> dict:
    import resource

    import onnxruntime as ort

    from apet.contracts.compression import CompressionConfig, Stage2Config
    from apet.contracts.onnx_graph import check_onnx
    from apet.export.decoder import DecoderGraph
    from apet.export.llm import export_llm
    from apet.modeling.blocks import empty_past
    from apet.models.registry import load_adapter

    torch.manual_seed(0)
    t0 = time.perf_counter()
    adapter = load_adapter("llava-shapes", dtype=torch.float16, device=args.device)
    load_s = time.perf_counter() - t0
    stage2 = Stage2Config(layer=16, span=96, compression=CompressionConfig(keep=32, placement="rank"))
    path = args.out / "llm.onnx"
    quant: dict = {}
    if args.weights != "fp16":  # in place, layer by layer (apet.quant.apply), as apet-export --weights does
        from apet.contracts.plan import plan_compression
        from apet.contracts.weights import WeightSpec, default_method
        from apet.export.calibration import CalibrationSource, build_calibration
        from apet.quant.apply import quantize_model

        method = args.calibration or default_method(args.weights)
        t0 = time.perf_counter()
        calibration = None
        if method == "awq":
            plan = plan_compression(576, 32, ratio=0.11, stages=2, stage1_placement="mask")
            calibration = build_calibration(adapter, plan, *CalibrationSource(limit=4).pairs())
        result = quantize_model(adapter, WeightSpec(args.weights, None, method), calibration)
        quant = {"weights": result.spec.describe("fp16"), "quantize_s": round(time.perf_counter() - t0, 1),
                 **result.summary()}
    t0 = time.perf_counter()
    export_llm(adapter, stage2, path, opset=21 if args.weights != "fp16" else 17)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_onnx(path)
    check_s = time.perf_counter() - t0
    sizes = _sizes(args.out)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"load_s": round(load_s, 1), "export_s": round(export_s, 1), "check_s": round(check_s, 1),
              "files": sizes, "peak_host_rss_gb": round(peak_rss_gb, 2), **quant}
    # agreement on a short prompt: 8 text + 96 "image" + rest, image_start 4
    length = 96 + args.prompt_tokens
    generator = torch.Generator().manual_seed(1)
    embeds = (torch.randn(1, length, 4096, generator=generator) * 0.02).half()
    positions = torch.arange(length)[None]
    mask = torch.ones(1, length, dtype=torch.long)
    start = torch.tensor([4])
    with torch.no_grad():
        graph = DecoderGraph(adapter, stage2).eval()
        want = graph(embeds.to(args.device), positions.to(args.device), mask.to(args.device), start.to(args.device),
                     *empty_past(adapter, 1))
    t0 = time.perf_counter()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session_s = time.perf_counter() - t0
    feed = {"inputs_embeds": embeds.numpy(), "position_ids": positions.numpy(), "attention_mask": mask.numpy(),
            "image_start": start.numpy()}
    for i in range(32):
        for kind in ("key", "value"):
            feed[f"past_{kind}.{i}"] = np.zeros((1, 32, 0, 128), np.float16)
    t0 = time.perf_counter()
    got = session.run(["logits", "stage2_index"], feed)
    run_s = time.perf_counter() - t0
    torch_logits = want[0].float().cpu().numpy()
    diff = np.abs(got[0].astype(np.float32) - torch_logits)
    result.update({
        "ort_session_s": round(session_s, 1), "ort_prefill_s": round(run_s, 1), "prompt_tokens": length,
        "logits_max_abs_diff": float(diff.max()), "logits_scale": float(np.abs(torch_logits).max()),
        "argmax_equal": bool(got[0].argmax() == torch_logits.argmax()),
        "top5_overlap": len(set(np.argsort(-got[0][0, -1])[:5]) & set(np.argsort(-torch_logits[0, -1])[:5])),
        "stage2_index_equal": bool((got[1] == want[1].cpu().numpy()).all()),
    })
    return result


def build(args: argparse.Namespace) -> dict:
    from apet.engines.api import load_api
    from apet.engines.trt import BuildOptions, Profile, build_engine

    api = load_api("tensorrt-rtx")
    shape = (3, 336, 336)
    profile = Profile("vision", {"pixel_values": ((1, *shape), (1, *shape), (4, *shape))})
    built = build_engine(api, args.onnx, [profile], BuildOptions(compute_capabilities=tuple(args.targets.split(","))))
    (args.onnx.parent / "vision.plan").write_bytes(built.plan)
    return {"builder": f"{api.kind} {api.version}", "build_s": round(built.seconds, 1), "engine_bytes": len(built.plan),
            "layers": built.num_layers, "targets": built.compute_capabilities, "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("vision", "llm", "build"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--onnx", type=Path)
    parser.add_argument("--keep", type=int, default=96)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--targets", default="sm86,sm89")
    parser.add_argument("--weights", default="fp16", choices=("fp16", "int8", "int4"))
    parser.add_argument("--calibration", choices=("rtn", "awq"))
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    result = {"vision": vision, "llm": llm, "build": build}[args.part](args)
    suffix = f"_{args.weights}" if args.part == "llm" and args.weights != "fp16" else ""
    target = (args.out or args.onnx.parent) / f"proof_{args.part}{suffix}.json"
    target.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
