"""Device memory and decode-step time of ONNX Runtime CUDA on a static-KV artifact as a server meets batch sizes one
after another: the decode steps (and the graphed vision) of every batch size in one session with a CUDA graph per
size (the default), or a fixed-shape session per batch size (``--sessions per-batch``, the form before; each session
loads its own copy of the weights); ``--rewrites default,share-weights``: the prefill's and decode's sessions
reading one copy (apet/runtime/backends/ort_bound_weights.py). Run each form in its own process: ONNX Runtime's
arena does not hand memory back.

    python scripts/ort_decode_memory.py ARTIFACT --out ort_decode_memory.json [--sessions shared|per-batch]

Memory is the device's used bytes (``cuMemGetInfo`` through apet.cuda_memory), after the backend loads and after
each batch size's first requests; time is the host wall clock of greedy decode steps (median, p10-p90); the greedy
tokens of those steps are kept so that the two forms' runs can be compared (``--compare OTHER.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from apet.atomic import write_atomic
from apet.bench.timing import time_call

GIB = 1024 ** 3


def measure(artifact: Path, sessions: str, batches: tuple[int, ...], steps: int, device: str = "cuda",
            rewrites: str = "default") -> dict[str, Any]:
    import numpy as np

    from apet.bench.ort_profile import artifact_request
    from apet.cuda_memory import CudaDevice
    from apet.manifest import read_manifest
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from apet.runtime.backends.ort_session import GraphSessions

    cuda = CudaDevice(0) if device == "cuda" else None

    def used_gib() -> float | None:  # None on the CPU (a dry run of the script)
        if cuda is None:
            return None
        free, total = cuda.memory_info()
        return round((total - free) / GIB, 3)

    before = used_gib()
    if sessions == "per-batch":  # as if ONNX Runtime refused every shared session (decode, the graphed vision)
        made = GraphSessions.__init__

        def refused(self: Any, *args: Any, **kwargs: Any) -> None:
            made(self, *args, **kwargs)
            self.shared = False

        GraphSessions.__init__ = refused
    manifest = read_manifest(artifact)
    if max(batches) > manifest.max_batch:  # the graphs' batch dim is free: the limit is the manifest's promise only
        manifest = dataclasses.replace(manifest, max_batch=max(batches))
    backend = OnnxRuntimeBackend(artifact, manifest, device, rewrites=rewrites)
    static = backend.static
    result: dict[str, Any] = {"artifact": str(artifact), "sessions": sessions, "rewrites": sorted(backend.rewrites),
                              "device_used_gib": {"start": before},
                              "decode_step_ms": {}, "greedy_tokens": {}}
    result["device_used_gib"]["loaded"] = used_gib()
    for batch in batches:
        processor, inputs, make_layout = artifact_request(artifact, manifest, batch, (640, 480), 40, steps + 8)
        state: dict[str, Any] = {}

        def first_token() -> None:
            visual = backend.encode(inputs)
            state["layout"] = layout = make_layout(visual.keep_index)
            state["logits"], state["mask"] = backend.prefill(layout, visual), layout.attention_mask

        def decode_step() -> None:
            state["mask"] = np.concatenate([state["mask"], np.ones_like(state["mask"][:, :1])], axis=1)
            token = state["logits"].argmax(-1)
            state.setdefault("tokens", []).append(token.tolist())
            state["logits"] = backend.decode(token.astype(np.int64), state["mask"],
                                             processor.decode_positions(state["layout"], state["mask"]))

        for _ in range(3):  # warm-up: the captures
            first_token()
            for _ in range(3):
                decode_step()
        first_token()
        state["tokens"] = []
        result["decode_step_ms"][str(batch)] = time_call(decode_step, device="cpu", warmup=0,
                                                         repeats=steps).to_json()
        result["greedy_tokens"][str(batch)] = state["tokens"]  # each form's, compared: the same request's tokens
        result["device_used_gib"][f"after_batch_{batch}"] = used_gib()
    result["decode_sessions"] = len({id(step.session) for step in static.steps.values()})
    if backend.graphed_vision is not None:  # None: graphed vision off (CPU) or refused for this artifact
        result["vision_sessions"] = len({id(run.session) for run in backend.graphed_vision.runs.values() if run})
    result["shared_session_graphed"] = {str(k): v for k, v in static.graphed_shared.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sessions", choices=("shared", "per-batch"), default="shared")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--rewrites", default="default", help="apet-bench --ort-rewrites (e.g. default,share-weights)")
    parser.add_argument("--compare", type=Path, help="another form's JSON: report whether its greedy tokens equal")
    args = parser.parse_args(argv)
    result = measure(args.artifact, args.sessions, tuple(int(b) for b in args.batches.split(",")), args.steps,
                     args.device, args.rewrites)
    if args.compare is not None:
        other = json.loads(args.compare.read_text())
        result["greedy_tokens_equal_to"] = {"file": args.compare.name, "sessions": other["sessions"],
                                            "equal": other["greedy_tokens"] == result["greedy_tokens"]}
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("sessions", "rewrites", "decode_sessions", "vision_sessions",
                                                 "shared_session_graphed", "device_used_gib",
                                                 "greedy_tokens_equal_to")}))
    print({b: round(t["median_ms"], 3) for b, t in result["decode_step_ms"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
