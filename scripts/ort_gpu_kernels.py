"""What ONNX Runtime's CUDA execution provider runs on the GPU for one exported artifact, per phase (vision encode,
prefill, the two as a request's first token, one decode step): the host wall time per call beside the GPU's
kernel-busy time, the kernel and copy counts and the kernels that take the time. ONNX Runtime's own profiler
times only the host side of each node (apet.bench.ort_profile); CUPTI, through the PyTorch profiler in the same
process, sees every kernel that any library launches on the device, ONNX Runtime's and CUDA-graph replays included.
Wall minus busy is what the host (launches, copies, synchronisation) adds.

    python scripts/ort_gpu_kernels.py ARTIFACT [--no-cuda-graphs] --out ort_kernels.json

Issue 28 part 4: why the static-KV form's TTFT and decode stay behind the torch path on the H200.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from apet.atomic import write_atomic

log = logging.getLogger("ort_gpu_kernels")
GPU_CATEGORIES = {"kernel": "kernels", "gpu_memcpy": "copies", "gpu_memset": "memsets"}
CALL_MARK = "apet_call"  # the profiler range around each timed call: its GPU events are the ones inside it
HOST_RANGE = "user_annotation"  # the range on the host's timeline (Kineto copies it onto the GPU's as
# gpu_user_annotation, spanning exactly the GPU work, which would hide the time before and after it)


def profile_phase(call: Callable[[], Any], calls: int) -> dict[str, Any]:
    """``calls`` runs of ``call`` under the profiler: wall ms per call, GPU ms per call by category, top kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    walls = []
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            start = time.perf_counter()
            with torch.profiler.record_function(CALL_MARK):
                call()
            walls.append((time.perf_counter() - start) * 1e3)
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    return summarize_trace(events, walls)


def summarize_trace(events: list[dict[str, Any]], walls: list[float], top: int = 15) -> dict[str, Any]:
    """Chrome-trace events of ``len(walls)`` calls -> per call: GPU ms and counts by category (kernels, copies,
    memsets; ``dur`` is in µs), the kernels that took the most time, and the wall time GPU work does not cover."""
    calls = len(walls)
    busy, counts, by_kernel = defaultdict(float), Counter(), defaultdict(float)
    for event in events:
        kind = GPU_CATEGORIES.get(str(event.get("cat", "")).lower())
        if kind is None:
            continue
        busy[kind] += float(event.get("dur", 0.0)) / 1e3
        counts[kind] += 1
        if kind == "kernels":
            by_kernel[str(event.get("name", "?"))[:120]] += float(event.get("dur", 0.0)) / 1e3
    ranked = sorted(by_kernel.items(), key=lambda item: -item[1])[:top]
    gpu_ms = sum(busy.values()) / calls
    wall = float(np.median(walls))
    return {"calls": calls, "wall_ms_median": round(wall, 4), "wall_ms_min": round(min(walls), 4),
            "gpu_ms_per_call": {k: round(v / calls, 4) for k, v in busy.items()},
            "gpu_busy_ms_per_call": round(gpu_ms, 4),
            "host_ms_per_call": round(wall - gpu_ms, 4),  # wall not covered by GPU work (an upper bound on overlap)
            "count_per_call": {k: round(v / calls, 1) for k, v in counts.items()},
            "top_kernels_ms_per_call": [[name, round(ms / calls, 4)] for name, ms in ranked],
            "timeline": call_timeline(events)}


def call_timeline(events: list[dict[str, Any]], top: int = 8) -> dict[str, Any]:
    """Where each call's wall time goes around its GPU work (medians over the calls, ms): before the first GPU
    event (host work, input copies queued), the span from the first GPU event to the last, the idle time inside
    that span (gaps between kernels, in a CUDA graph's replay too), after the last GPU event (outputs read back, the
    return); and the largest gaps inside the span with the events around them (summed over the calls)."""
    marks = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                   if e.get("name") == CALL_MARK and str(e.get("cat", "")).lower() == HOST_RANGE)
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name", "?"))[:80])
                 for e in events if str(e.get("cat", "")).lower() in GPU_CATEGORIES and "ts" in e)
    rows, gaps = [], Counter()
    for start, end in marks:
        inside = [g for g in gpu if start <= g[0] < end]
        if not inside:
            continue
        idle, reach = 0.0, inside[0][1]
        for before, after in zip(inside, inside[1:]):
            reach = max(reach, before[1])
            if after[0] > reach:
                idle += after[0] - reach
                gaps[f"{before[2]} -> {after[2]}"] += after[0] - reach
        last = max(g[1] for g in inside)
        rows.append((inside[0][0] - start, last - inside[0][0], idle, end - last))
    if not rows:
        return {}
    lead, span, idle, tail = (float(np.median([row[i] for row in rows])) / 1e3 for i in range(4))
    return {"calls": len(rows), "before_gpu_ms": round(lead, 4), "gpu_span_ms": round(span, 4),
            "idle_in_span_ms": round(idle, 4), "after_gpu_ms": round(tail, 4),
            "largest_gaps_ms_per_call": [[name, round(us / 1e3 / len(rows), 4)] for name, us in gaps.most_common(top)]}


def run(artifact: Path, cuda_graphs: bool, calls: int, decode_steps: int,
        decode_attention: str = "auto", rewrites: str = "default") -> dict[str, Any]:
    from apet.bench.ort_profile import artifact_request
    from apet.manifest import read_manifest
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend

    manifest = read_manifest(artifact)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = OnnxRuntimeBackend(artifact, manifest, device, cuda_graphs=cuda_graphs,
                                 decode_attention=decode_attention, rewrites=rewrites)
    processor, inputs, make_layout = artifact_request(artifact, manifest, 1, (640, 480), 40, decode_steps + 4)
    state: dict[str, Any] = {}

    def request() -> None:  # one request: vision, prefill, a few decode steps (warm-up and the decode phase's start)
        backend.first_token(inputs, make_layout)  # as a request runs it (with first-token: one run)
        state["visual"] = backend.encode(inputs)  # the phases apart (with first-token, each in its own session)
        state["layout"] = make_layout(state["visual"].keep_index)
        state["logits"] = backend.prefill(state["layout"], state["visual"])
        state["mask"] = state["layout"].attention_mask

    def decode() -> None:
        state["mask"] = np.concatenate([state["mask"], np.ones_like(state["mask"][:, :1])], axis=1)
        state["logits"] = backend.decode(state["logits"].argmax(-1).astype(np.int64), state["mask"],
                                         processor.decode_positions(state["layout"], state["mask"]))

    for _ in range(3):  # warm-up: ORT's kernels, the decode session and the CUDA-graph captures (the prompt's: third)
        request()
        for _ in range(3):
            decode()
    phases = {"vision": profile_phase(lambda: backend.encode(inputs), calls),
              "prefill": profile_phase(lambda: backend.prefill(state["layout"], state["visual"]), calls),
              # as a request runs it: vision, layout, prefill (with first-token: one run)
              "first_token": profile_phase(lambda: backend.first_token(inputs, make_layout), calls)}
    state["logits"] = backend.prefill(state["layout"], state["visual"])
    state["mask"] = state["layout"].attention_mask
    phases["decode_step"] = profile_phase(decode, decode_steps)
    import onnxruntime as ort

    return {"artifact": str(artifact), "kv_cache": manifest.kv_cache, "attention": manifest.attention,
            "cuda_graphs": cuda_graphs, "decode_attention": backend.decode_attention(),
            "vision_cuda_graph": backend.vision_graphed(), "prompt_cuda_graph": backend.prompt_graphed(),
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "device": device, "phases": phases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--no-cuda-graphs", action="store_true", help="the static form's decode without CUDA graphs")
    parser.add_argument("--decode-attention", default="auto", choices=("auto", "gqa", "graph"),
                        help="the static form's decode attention (apet-run --decode-attention)")
    parser.add_argument("--rewrites", default="default", help="the optional graph rewrites (apet-run --ort-rewrites)")
    parser.add_argument("--calls", type=int, default=5, help="profiled vision and prefill calls")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.artifact, not args.no_cuda_graphs, args.calls, args.decode_steps, args.decode_attention,
                 args.rewrites)
    write_atomic(args.out, json.dumps(result, indent=1).encode())
    for name, phase in result["phases"].items():
        log.info("%-12s wall %.3f ms | GPU busy %.3f ms | counts %s", name, phase["wall_ms_median"],
                 phase["gpu_busy_ms_per_call"], phase["count_per_call"])
        log.info("    timeline %s", {k: v for k, v in phase["timeline"].items() if k != "largest_gaps_ms_per_call"})
        for kernel, ms in phase["top_kernels_ms_per_call"][:6]:
            log.info("    %.4f ms  %s", ms, kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
