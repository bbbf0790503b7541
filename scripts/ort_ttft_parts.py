"""Where ONNX Runtime CUDA's time to first token goes on one exported artifact: the vision encode, the prefill and
a decode step timed apart (no profiler), with CUDA graphs (vision, prompt, decode) and each set of the optional
graph rewrites (apet/runtime/backends/ort_options.py ``GRAPH_REWRITES``: none, each alone, all), and without CUDA
graphs, in one process.

    python scripts/ort_ttft_parts.py ARTIFACT --out ort_ttft_parts.json

Issue 28: the TTFT ratio against the torch path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from apet.atomic import write_atomic
from apet.bench.timing import time_call


def _timed(call: Any, repeats: int) -> dict[str, float]:
    """Host wall clock over ``repeats`` calls (each ONNX Runtime run returns synchronized)."""
    return time_call(call, device="cpu", warmup=0, repeats=repeats).to_json()


def parts(artifact: Path, cuda_graphs: bool, repeats: int, rewrites: tuple[str, ...] = (),
          threads: int | None = None, host_caches: bool = True) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from apet.bench.ort_profile import artifact_request
    from apet.manifest import read_manifest
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend

    manifest = read_manifest(artifact)
    device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    backend = OnnxRuntimeBackend(artifact, manifest, device, threads=threads, cuda_graphs=cuda_graphs,
                                 rewrites=rewrites)
    processor, inputs, make_layout = artifact_request(artifact, manifest, 1, (640, 480), 40, repeats + 8)
    if not host_caches:  # the first token's host work as before the caches: every layout built, every input uploaded
        from apet.models.prompt import LayoutCache
        from apet.runtime.backends import ort_session

        processor.encoder.layouts = LayoutCache(0)
        ort_session.SKIP_UNCHANGED_BYTES = -1
    visual = backend.encode(inputs)
    layout = make_layout(visual.keep_index)
    state: dict[str, Any] = {}

    def first_token() -> None:  # as a request runs it (with first-token: vision and prefill in one graph)
        state["logits"] = backend.first_token(inputs, make_layout).logits
        state["mask"] = layout.attention_mask

    def decode_step() -> None:  # greedy, one position further each call (the static cache holds them)
        state["mask"] = np.concatenate([state["mask"], np.ones_like(state["mask"][:, :1])], axis=1)
        state["logits"] = backend.decode(state["logits"].argmax(-1).astype(np.int64), state["mask"],
                                         processor.decode_positions(layout, state["mask"]))

    for _ in range(4):  # warm-up: kernels, the decode session, the CUDA-graph captures
        first_token()
        for _ in range(3):
            decode_step()
    result = {"cuda_graphs": cuda_graphs, "rewrites": sorted(backend.rewrites), "intra_op_threads": threads,
              "host_caches": host_caches,
              "ort_environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ORT_")},
              "vision_graphed": backend.vision_graphed(),
              "prompt_graphed": backend.prompt_graphed(),
              "first_token_graphed": backend.first_token_graphed(),
              "vision": _timed(lambda: backend.encode(inputs), repeats),
              "layout": _timed(lambda: make_layout(visual.keep_index), repeats),
              "prefill": _timed(lambda: backend.prefill(layout, visual), repeats),
              "vision_and_prefill": _timed(first_token, repeats),
              "inside_first_token": _inside_first_token(backend, inputs, make_layout, repeats)}
    first_token()
    result["decode_step"] = _timed(decode_step, repeats)
    return result


def _inside_first_token(backend: Any, inputs: Any, make_layout: Any, repeats: int) -> dict[str, float]:
    """Median ms of each step of back-to-back first tokens (encode, layout, prefill): whether a step takes longer
    right after the others than alone (vision_and_prefill exceeded the sum of the parts by ~0.5 ms on the H200)."""
    import statistics

    from apet.bench.ort_profile import timed_first_token

    steps: dict[str, list[float]] = {}
    for _ in range(repeats):
        timed_first_token(backend, inputs, make_layout, steps)
    return {f"{name}_median_ms": round(statistics.median(values), 4) for name, values in steps.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sets", default="", help="semicolon-separated rewrite sets to time with CUDA graphs "
                        "(default: none, each alone, all)")
    parser.add_argument("--no-ungraphed", action="store_true", help="leave out the run without CUDA graphs")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime's intra-op threads (default: its "
                        "own, one per core; 1: no thread pool, so no worker spins on the host between runs)")
    parser.add_argument("--no-host-caches", action="store_true", help="lay every first token's prompt out and upload "
                        "every input again (the prompt encoder's layout cache off, a prompt graph's unchanged small "
                        "inputs uploaded anyway): what the two save")
    args = parser.parse_args(argv)
    from apet.runtime.backends.ort_options import GRAPH_REWRITES

    sets = [tuple(s.split(",")) if s not in ("", "none") else () for s in args.sets.split(";")] if args.sets \
        else [(), *((name,) for name in GRAPH_REWRITES), tuple(GRAPH_REWRITES)]
    runs = []
    for graphs, rewrites in [*((True, chosen) for chosen in sets), *([] if args.no_ungraphed else [(False, ())])]:
        runs.append(parts(args.artifact, graphs, args.repeats, rewrites, args.threads, not args.no_host_caches))
        gc.collect()  # the previous backend's sessions and device buffers go before the next one's
    for run in runs:
        print(json.dumps(run))
    write_atomic(args.out, json.dumps({"artifact": str(args.artifact), "runs": runs}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
