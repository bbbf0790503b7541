"""The graphed vision session of one exported artifact in ONNX Runtime CUDA, made several ways
(:class:`apet.runtime.backends.ort_graphed.VisionSessionForm`): as exported (pixels cast to float16 on the host),
its attention in token layout (:mod:`apet.runtime.backends.ort_vision`), that with ONNX Runtime's
``MatMulAddFusion`` left out (the fusion turns each projection and its bias into a ``Gemm`` whose CUDA kernel first
broadcasts the bias into the output, one extra pass per projection), the default (both, and the float32 pixels
cast on the device), and the default with each residual sum and its LayerNorm as one ``SkipLayerNormalization``,
with the q/k/v projections packed into one (:mod:`apet.runtime.backends.ort_pack`), with both, and with both under
ONNX Runtime's strict SkipLayerNorm mode (float32 Welford statistics; apet turns it on for releases before 1.31).
Per form: wall ms per image from the processor's float32 pixels (no profiler), then GPU-busy ms, kernel counts and
top kernels under CUPTI (scripts/ort_gpu_kernels.py), and the outputs against the exported form's.

    python scripts/ort_vision_variants.py ARTIFACT --out ort_vision_variants.json

Issue 28: the vision graph's share of ORT-CUDA's TTFT at LLaVA-1.5-7B shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_gpu_kernels import profile_phase  # noqa: E402

from apet.atomic import write_atomic  # noqa: E402
from apet.bench.timing import time_call  # noqa: E402

log = logging.getLogger("ort_vision_variants")
FUSION = "MatMulAddFusion"


def forms() -> dict[str, tuple[Any, bool]]:
    """name -> (the session's form, whether its CUDA provider runs the fused norms in strict mode)."""
    from apet.runtime.backends.ort_graphed import VisionSessionForm

    plain = VisionSessionForm(token_layout=False, cast_inputs=False, disabled_optimizers=())
    both = VisionSessionForm(skip_layer_norms=True, pack_projections=True)
    return {"exported": (plain, False),
            "token_layout_no_gemm": (replace(plain, token_layout=True, disabled_optimizers=(FUSION,)), False),
            "default": (VisionSessionForm(), False),
            "default_skip_norms": (VisionSessionForm(skip_layer_norms=True), False),
            "default_packed": (VisionSessionForm(pack_projections=True), False),
            "default_skip_norms_packed": (both, False),
            "default_skip_norms_packed_strict": (both, True)}


def run(artifact: Path, repeats: int, calls: int) -> dict[str, Any]:
    import onnxruntime as ort

    from apet.manifest import read_manifest
    from apet.runtime.backends.ort_graphed import GraphedVision, fixed_shapes
    from apet.runtime.backends.ort_options import STRICT_NORM_OPTION, cuda_provider, session_options
    from apet.runtime.backends.ort_session import SessionSetup

    spec = read_manifest(artifact).graphs["vision"]
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal(shape).astype(np.float32 if np.dtype(kind).kind == "f" else kind)
            for name, (shape, kind) in fixed_shapes(spec.inputs, 1).items()}  # float32, as the processor gives
    results: dict[str, Any] = {}
    reference: dict[str, np.ndarray] | None = None
    for name, (form, strict) in forms().items():
        provider, options = cuda_provider()
        cuda_providers = [(provider, {**options, STRICT_NORM_OPTION: "1" if strict else "0"})]
        setup = SessionSetup(ort, session_options(ort), cuda_providers if cuda else providers,
                             "cuda" if cuda else "cpu", cuda)
        started = time.perf_counter()
        graphed = GraphedVision(artifact / spec.file, spec, setup, form)
        outputs = graphed(feed)
        if outputs is None:
            results[name] = {"error": "ONNX Runtime refused the CUDA graph"}
            continue
        load_s = time.perf_counter() - started
        for _ in range(5):
            graphed(feed)
        def call(graphed: GraphedVision = graphed) -> None:
            graphed(feed)

        wall = time_call(call, device="cpu", warmup=0, repeats=repeats).to_json()  # host clock: the run syncs
        entry: dict[str, Any] = {"load_s": round(load_s, 2), "wall": wall,
                                 "profile": profile_phase(call, calls)}
        outputs = {k: np.asarray(v).copy() for k, v in graphed(feed).items()}
        if reference is None:
            reference = outputs
        entry["against_exported"] = {
            key: ({"max_abs_diff": float(np.abs(value.astype(np.float64) - reference[key]).max())}
                  if value.dtype.kind == "f" else {"equal": bool(np.array_equal(value, reference[key]))})
            for key, value in outputs.items()}
        results[name] = entry
        log.info("%-22s wall %.3f ms (p90 %.3f) | GPU busy %.3f ms | kernels %s | %s", name,
                 entry["wall"]["median_ms"], entry["wall"]["p90_ms"], entry["profile"]["gpu_busy_ms_per_call"],
                 entry["profile"]["count_per_call"].get("kernels"), entry["against_exported"])
        for kernel, ms in entry["profile"]["top_kernels_ms_per_call"][:6]:
            log.info("    %.4f ms  %s", ms, kernel)
        graphed.runs.clear()  # its session and device buffers go before the next form's
    return {"artifact": str(artifact), "onnxruntime": ort.__version__, "providers": providers,
            "vision_shapes": {k: list(v.shape) for k, v in feed.items()}, "forms": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--calls", type=int, default=10, help="profiled calls per form")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.artifact, args.repeats, args.calls)
    write_atomic(args.out, json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
