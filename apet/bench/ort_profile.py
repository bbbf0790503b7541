"""Where an exported artifact spends its time in ONNX Runtime, per scope: the vision tower, ApET's two stages, the
projector and the decoder layers, from ONNX Runtime's own profiler (both sessions, one synthetic request repeated).

    python -m apet.bench.ort_profile ARTIFACT [ARTIFACT ...] --device cuda --out ort_profile.json

What the numbers are: ONNX Runtime records, per node, the host time of its ``Compute`` call (``*_kernel_time``).
On the CPU that is the node's run time; with the CUDA execution provider kernels are launched asynchronously, so
it is the host-side cost of launching the node's kernels (plus any wait the node forces, e.g. a copy to the host)
— what a launch-bound subgraph such as ApET costs. Builds of ONNX Runtime with CUDA profiling (CUPTI) also record
the GPU kernels each node ran (``cat: Kernel``, written after their node); their time is reported as ``gpu_ms``
where present. Nodes ONNX Runtime's graph optimizers created carry no scope in their name; they count with the
node run before them. ``run_ms`` is the session's whole ``model_run`` (host wall time, GPU work included: each run ends
by copying outputs to the host). The first ``--warmup`` requests are dropped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from apet import scopes
from apet.atomic import write_atomic

log = logging.getLogger(__name__)
UNATTRIBUTED = "(unattributed)"
KERNEL_SUFFIX = "_kernel_time"


def _stage(node: str) -> str:
    """A node's stage; ONNX Runtime prefixes nodes it inserts (``InsertedPrecisionFreeCast_/vision/...``)."""
    found = scopes.scopes_in(node[node.find("/"):] if "/" in node else node)
    return scopes.stage_of(found[0]) if found else UNATTRIBUTED


def split_runs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per ``model_run`` of a session trace: its wall ms and, per stage, the host ms of its nodes and
    (CUPTI builds) the GPU ms of their kernels."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: float(e["ts"]))
    out = [{"run_ms": float(r["dur"]) / 1e3, "host_ms": defaultdict(float), "gpu_ms": defaultdict(float)}
           for r in runs]
    spans = [(float(r["ts"]), float(r["ts"]) + float(r["dur"])) for r in runs]
    last_stage, last_run = UNATTRIBUTED, None  # events are in execution order
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith(KERNEL_SUFFIX):
            ts = float(event.get("ts", 0))
            run = next((i for i, (start, end) in enumerate(spans) if start <= ts <= end), None)
            stage = _stage(str(event["name"])[: -len(KERNEL_SUFFIX)])
            # nodes ONNX Runtime's optimizers made (``Sub_300``) carry no scope: they run among their source's nodes
            last_stage = last_stage if stage == UNATTRIBUTED and run == last_run else stage
            last_run = run
            if last_run is not None:
                out[last_run]["host_ms"][last_stage] += float(event.get("dur", 0)) / 1e3
        elif event.get("cat") == "Kernel" and last_run is not None:  # a GPU kernel of the node just before it
            out[last_run]["gpu_ms"][last_stage] += float(event.get("dur", 0)) / 1e3
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over runs: run_ms and ms per stage (host, and GPU where recorded)."""
    if not runs:
        return {"runs": 0}
    stages = sorted({s for r in runs for s in r["host_ms"]} | {s for r in runs for s in r["gpu_ms"]})
    summary: dict[str, Any] = {"runs": len(runs), "run_ms": round(float(np.mean([r["run_ms"] for r in runs])), 4),
                               "host_ms": {s: round(float(np.mean([r["host_ms"].get(s, 0.0) for r in runs])), 4)
                                           for s in stages}}
    if any(r["gpu_ms"] for r in runs):
        summary["gpu_ms"] = {s: round(float(np.mean([r["gpu_ms"].get(s, 0.0) for r in runs])), 4) for s in stages}
    return summary


def _ratios(vision: dict[str, Any], prefill: dict[str, Any]) -> dict[str, float | None]:
    """ApET's time over what it sits beside: stage 1 over the vision tower, stage 2 over the decoder layers."""
    def over(phase: dict[str, Any], top: str, bottom: str) -> float | None:
        host = phase.get("host_ms", {})
        return round(host[top] / host[bottom], 4) if host.get(top) and host.get(bottom) else None

    return {"apet_stage1_over_vision": over(vision, scopes.APET_STAGE1, scopes.VISION),
            "apet_stage2_over_llm_layers": over(prefill, scopes.APET_STAGE2, "llm layers")}


FIRST_TOKEN_STEPS = ("encode", "layout", "prefill")


def timed_first_token(backend: Any, inputs: Any, make_layout: Any, steps: dict[str, list[float]]) -> tuple:
    """One first token through ``backend`` (vision encode, the layout from its kept indices, prefill) -> (visual,
    layout, logits), each step's wall ms appended to ``steps`` under :data:`FIRST_TOKEN_STEPS`: where a first token's
    time goes inside back-to-back requests (``apet-bench``'s ORT run and ``scripts/ort_ttft_parts.py``); a backend
    that runs vision and prefill as one graph (``first-token``) reports them together as the prefill."""
    first = backend.first_token(inputs, make_layout)
    for name, ms in zip(FIRST_TOKEN_STEPS, (first.vision_ms, first.layout_ms, first.prefill_ms)):
        steps.setdefault(name, []).append(ms)
    return first.visual, first.layout, first.logits


def tokenizer_dir(directory: Path | None) -> Path | None:
    """``directory`` where it holds a tokenizer (tokenizer.json), else None: the family's processor then makes
    random ids (random-weight ``*-shapes`` checkpoints have no tokenizer)."""
    return directory if directory is not None and (Path(directory) / "tokenizer.json").is_file() else None


def synthetic_request(manifest: Any, tokenizer: Path | None, batch: int, image_size: tuple[int, int],
                      prompt_tokens: int, new_tokens: int, seed: int = 0):
    """(processor, vision inputs, keep_index -> Layout): the family's own processor on seeded random media and
    filler words around the visual span, the request every apet benchmark runs (``tokenizer``: see
    :func:`tokenizer_dir`)."""
    from apet.models.registry import family_of

    family = family_of(manifest)
    processor = family.processor(tokenizer, manifest)
    medium = family.synthetic_media(manifest, np.random.default_rng(seed), image_size)
    inputs = processor.vision_inputs([medium] * batch)
    before = processor.encoder.text_before_media()
    prompt = " ".join(["word"] * max(1, prompt_tokens - before))
    return processor, inputs, lambda keep_index: processor.layout([prompt] * batch, inputs, keep_index, new_tokens)


def artifact_request(artifact: Path, manifest: Any, batch: int, image_size: tuple[int, int], prompt_tokens: int,
                     new_tokens: int):
    """:func:`synthetic_request` with the artifact's tokenizer where it has one."""
    return synthetic_request(manifest, tokenizer_dir(artifact), batch, image_size, prompt_tokens, new_tokens)


def profile_artifact(artifact: Path, device: str = "cuda", batch: int = 1, image_size: tuple[int, int] = (640, 480),
                     prompt_tokens: int = 40, decode_steps: int = 16, repeats: int = 5, warmup: int = 2) -> dict:
    """Run ``warmup + repeats`` requests (vision, prefill, ``decode_steps`` greedy steps) with both sessions
    profiled; time per scope of the vision run, the prefill and one decode step."""
    from apet.manifest import read_manifest
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    with tempfile.TemporaryDirectory(prefix="apet-ort-profile-") as scratch:
        backend = OnnxRuntimeBackend(artifact, manifest, device, profile_dir=Path(scratch))
        processor, inputs, make_layout = artifact_request(artifact, manifest, batch, image_size, prompt_tokens,
                                                    decode_steps)
        for _ in range(warmup + repeats):
            visual = backend.encode(inputs)
            layout = make_layout(visual.keep_index)
            logits, mask = backend.prefill(layout, visual), layout.attention_mask
            for _ in range(decode_steps):
                mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
                logits = backend.decode(logits.argmax(-1).astype(np.int64), mask,
                                        processor.decode_positions(layout, mask))
        traces = {name: json.loads(path.read_text()) for name, path in backend.end_profiling().items()}
    vision_runs = split_runs(traces["vision"])[warmup:]
    llm_runs = split_runs(traces["llm"])[warmup * (1 + decode_steps):]
    per_request = 1 + decode_steps
    vision = summarize(vision_runs)
    prefill = summarize(llm_runs[::per_request])
    decode = summarize([r for i, r in enumerate(llm_runs) if i % per_request])
    import onnxruntime as ort

    return {"artifact": str(artifact), "family": manifest.model.family, "dtype": manifest.dtype,
            "compression": manifest.compression.budget_summary(manifest.model.n_tokens),
            "onnxruntime": ort.__version__, "device": device, "providers": backend.vision.get_providers(),
            "request": {"batch": batch, "image_size": list(image_size), "prompt_tokens": prompt_tokens,
                        "decode_steps": decode_steps, "repeats": repeats, "warmup": warmup},
            "vision": vision, "prefill": prefill, "decode_step": decode, "apet_share": _ratios(vision, prefill),
            "times_are": "host ms of each node's Compute call (CUDA: kernel launches, asynchronous); gpu_ms where "
                         "ONNX Runtime was built with CUDA profiling"}


def _size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apet.bench.ort_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path, help="directories written by apet-export")
    parser.add_argument("--device", default="cuda", help="cuda (CUDA execution provider) or cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image-size", type=_size, default=(640, 480), help="WxH of the synthetic image")
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = [profile_artifact(a, args.device, args.batch, args.image_size, args.prompt_tokens, args.decode_steps,
                                args.repeats, args.warmup) for a in args.artifacts]
    write_atomic(args.out, json.dumps({"schema": "apet-ort-profile/1", "profiles": results}, indent=1).encode())
    for result in results:
        log.info("%s: vision %s | prefill %s | ApET share %s", result["artifact"], result["vision"].get("host_ms"),
                 result["prefill"].get("host_ms"), result["apet_share"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
