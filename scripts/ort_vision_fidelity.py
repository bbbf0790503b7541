"""Which ONNX Runtime vision form stays closer to float32: the artifact's vision graph in ONNX Runtime (fp16, CUDA
graphs where they apply) with each set of the optional rewrites, against the torch reference path in float32 on the
same weights and pixels. Per image: whether the kept indices are equal, the largest error of a visual token relative
to the largest float32 value, and how many tokens are off by more than 1% of it (an ApET merge that went another
way: near-ties, docs/benchmarks.md "apet check at 7B shapes").

    python scripts/ort_vision_fidelity.py ARTIFACT --model llava-shapes --images 8 --out ort_vision_fidelity.json

Issue 28: whether ``vision-skip-norms`` (0.4 ms of the TTFT on the H200) is less faithful than the default form or
only differently rounded. The reference holds the float32 weights, a float16 artifact their rounding: an error
every ONNX Runtime form shares, so compare the forms with each other.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from apet.atomic import write_atomic
from apet.check.runners import as_numpy

OFF = 0.01  # a token off by more than this fraction of the largest float32 value took another merge


def compare(reference: Any, got: Any) -> dict[str, Any]:
    """Kept indices equal or not, the largest error relative to the largest reference value, tokens off."""
    want, have = as_numpy(reference.embeds), as_numpy(got.embeds)
    scale = float(np.abs(want).max()) or 1.0
    per_token = np.abs(have - want).reshape(-1, want.shape[-1]).max(axis=1) / scale
    keep_equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                     for a, b in zip(reference.keep_index, got.keep_index))
    return {"keep_equal": bool(keep_equal), "max_rel_error": round(float(per_token.max()), 5),
            "median_rel_error": round(float(np.median(per_token)), 6), "tokens_off": int((per_token > OFF).sum()),
            "tokens": int(per_token.size)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--model", required=True, help="the checkpoint (or *-shapes name) the artifact came from")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", default="640x480")
    parser.add_argument("--sets", default="default;default,vision-skip-norms",
                        help="semicolon-separated ONNX Runtime rewrite sets")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import onnxruntime as ort
    import torch

    from apet.manifest import read_manifest
    from apet.models.registry import family_of, load_adapter
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from apet.runtime.pipeline import make_backend

    manifest = read_manifest(args.artifact)
    family = family_of(manifest)
    width, height = (int(v) for v in args.image_size.split("x"))
    tokenizer = args.artifact if (args.artifact / "tokenizer.json").is_file() else None
    processor = family.processor(tokenizer, manifest)
    inputs = [processor.vision_inputs([family.synthetic_media(manifest, np.random.default_rng(seed), (width, height))])
              for seed in range(args.images)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = load_adapter(args.model, dtype=torch.float32, device=device)
    # the backend alone: a *-shapes artifact has no tokenizer for a pipeline's processor
    reference = make_backend("torch", args.artifact, manifest, device, adapter=adapter, torch_mode="reference")
    with torch.no_grad():
        wanted = [reference.encode(request) for request in inputs]
    del reference, adapter
    gc.collect()
    ort_device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    report: dict[str, Any] = {"artifact": str(args.artifact), "model": args.model, "onnxruntime": ort.__version__,
                              "device": ort_device, "off_threshold": OFF, "sets": []}
    for rewrites in args.sets.split(";"):
        backend = OnnxRuntimeBackend(args.artifact, manifest, ort_device, rewrites=rewrites)
        rows = [compare(want, backend.encode(request)) for want, request in zip(wanted, inputs)]
        summary = {"rewrites": sorted(backend.rewrites), "vision_graphed": backend.vision_graphed(),
                   "keep_equal": sum(row["keep_equal"] for row in rows), "images": len(rows),
                   "tokens_off": sum(row["tokens_off"] for row in rows), "tokens": sum(row["tokens"] for row in rows),
                   "max_rel_error": max(row["max_rel_error"] for row in rows), "per_image": rows}
        report["sets"].append(summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "per_image"}), flush=True)
        del backend
        gc.collect()
    write_atomic(args.out, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
