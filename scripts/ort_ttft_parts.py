"""Where ONNX Runtime CUDA's time to first token goes on one exported artifact: the vision encode and the prefill
timed apart (no profiler), with CUDA graphs (vision, prompt, decode) and without, in one process.

    python scripts/ort_ttft_parts.py ARTIFACT --out ort_ttft_parts.json

Issue 28: the TTFT ratio against the torch path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from apet.atomic import write_atomic
from apet.bench.timing import time_call


def _timed(call: Any, repeats: int) -> dict[str, float]:
    """Host wall clock over ``repeats`` calls (each ONNX Runtime run returns synchronized)."""
    return time_call(call, device="cpu", warmup=0, repeats=repeats).to_json()


def parts(artifact: Path, cuda_graphs: bool, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort

    from apet.bench.ort_profile import artifact_request
    from apet.manifest import read_manifest
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend

    manifest = read_manifest(artifact)
    device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    backend = OnnxRuntimeBackend(artifact, manifest, device, cuda_graphs=cuda_graphs)
    _, inputs, make_layout = artifact_request(artifact, manifest, 1, (640, 480), 40, 8)
    visual = backend.encode(inputs)
    layout = make_layout(visual.keep_index)

    def first_token() -> None:
        seen = backend.encode(inputs)
        backend.prefill(make_layout(seen.keep_index), seen)

    for _ in range(4):
        first_token()
    result = {"cuda_graphs": cuda_graphs, "vision_graphed": backend.vision_graphed(),
              "prompt_graphed": backend.prompt_graphed(),
              "vision": _timed(lambda: backend.encode(inputs), repeats),
              "layout": _timed(lambda: make_layout(visual.keep_index), repeats),
              "prefill": _timed(lambda: backend.prefill(layout, visual), repeats),
              "vision_and_prefill": _timed(first_token, repeats)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = [parts(args.artifact, graphs, args.repeats) for graphs in (True, False)]
    for run in runs:
        print(json.dumps(run))
    write_atomic(args.out, json.dumps({"artifact": str(args.artifact), "runs": runs}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
