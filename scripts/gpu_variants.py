"""Which GPU fast-path variants to ship, measured on one device in one process (run by hand on a CUDA machine).

  python scripts/gpu_variants.py --out variants.json [--model llava-shapes] [--ratio 0.11]

* ApET alone on [B, 576, 1024]: the fused Triton path vs the plain torch ops, eager / CUDA graph / compiled;
* the CLIP vision tower: HF attention implementation (sdpa vs eager) x (graphs, compile, compile max-autotune);
* where the time of prefill and decode goes: top CUDA kernels from the profiler for one graph replay each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from apet.bench.stages import ApetPath, Request, summarize_generation
from apet.bench.timing import time_call
from apet.compression import FUSED, compress
from apet.contracts.plan import plan_compression
from apet.modeling.fast_path import fast_towers
from apet.models.registry import get_family, load_adapter
from apet.runtime.cuda_graphs import GraphedCall


def _graph(fn: Callable, example: dict[str, torch.Tensor], compiled: str | None) -> GraphedCall:
    if compiled:
        fn = torch.compile(fn, dynamic=False, mode=None if compiled == "default" else compiled)
    return GraphedCall(fn, example)


def apet_variants(batch: int, keep: int) -> dict[str, float]:
    x = torch.randn(batch, 576, 1024, device="cuda", dtype=torch.float16)
    out: dict[str, float] = {}
    saved = dict(FUSED)
    FUSED["max_tokens"] = None  # N = 576: time the kernel too, not only the path the library picks
    for fused in (True, False):
        FUSED["enabled"] = fused
        name = "fused" if fused else "plain"
        out[f"{name}_eager"] = time_call(lambda: compress(x, keep=keep), device="cuda", repeats=50).median_ms
        for compiled in (None, "default"):
            call = _graph(lambda t: compress(t, keep=keep).tokens, {"t": x}, compiled)
            label = f"{name}_{'compile_' if compiled else ''}graph"
            out[label] = time_call(lambda: call(t=x), device="cuda", repeats=200).median_ms
    FUSED.update(saved)
    return {k: round(v, 4) for k, v in out.items()}


def vision_variants(adapter: Any, batch: int) -> dict[str, float]:
    """The HF attention implementations of the CLIP layers (the graph form: the fast path ignores them)."""
    with fast_towers(False):
        return _vision_variants(adapter, batch)


def _vision_variants(adapter: Any, batch: int) -> dict[str, float]:
    stages = get_family(adapter.family).vision_stages(adapter, lambda x: compress(x, keep=96))
    pixels = stages.example_inputs(batch)[0]
    out: dict[str, float] = {}
    for attn in ("sdpa", "eager"):
        adapter.model.set_attn_implementation(attn)
        for compiled in (None, "default", "max-autotune-no-cudagraphs"):
            try:
                call = _graph(lambda p: stages.vision(p), {"p": pixels}, compiled)
                out[f"{attn}_{compiled or 'graph'}"] = round(
                    time_call(lambda: call(p=pixels), device="cuda", repeats=100).median_ms, 4)
            except Exception as exc:  # report, do not stop the other variants
                out[f"{attn}_{compiled or 'graph'}"] = f"failed: {type(exc).__name__}: {exc}"[:200]
            torch._dynamo.reset()
    adapter.model.set_attn_implementation("sdpa")
    return out


def kernel_profile(fn: Callable[[], Any], count: int = 12, steps: int = 5) -> dict[str, Any]:
    """One call's CUDA kernels (torch profiler, ``steps`` calls averaged): how many, their summed device µs (the
    rest of the wall time is launch gaps) and the top ``count`` by device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / steps
    top = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:count]
    return {"kernels": round(sum(e.count for e in events) / steps, 1), "kernel_us": round(total, 1),
            "top": [{"kernel": e.key[:90], "calls": e.count // steps,
                     "us_per_step": round(e.device_time_total / steps, 1),
                     "share": round(e.device_time_total / steps / total, 3) if total else None} for e in top]}


def profile_top(fn: Callable[[], Any], count: int = 12) -> list[dict[str, Any]]:
    """The top kernels of :func:`kernel_profile`."""
    return kernel_profile(fn, count)["top"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llava-shapes")
    parser.add_argument("--ratio", type=float, default=0.11)
    args = parser.parse_args()
    torch.manual_seed(0)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    report["apet_ms"] = {f"batch{b}_keep{k}": apet_variants(b, k) for b, k in ((1, 96), (1, 64), (8, 96))}
    print(json.dumps(report["apet_ms"]), flush=True)
    adapter = load_adapter(args.model, dtype=torch.float16, device="cuda")
    report["vision_ms"] = vision_variants(adapter, 1)
    print(json.dumps(report["vision_ms"]), flush=True)
    spec = adapter.spec
    plan = plan_compression(spec.n_tokens, spec.decoder.num_layers, ratio=args.ratio, stages=2)
    t0 = time.perf_counter()
    path = ApetPath(adapter, plan, Request(1, 40, 64), graphs=True, compile=True, max_context=2048)
    report["setup_s"] = round(time.perf_counter() - t0, 1)
    path.generate()
    generation = summarize_generation([path.generate()[1] for _ in range(8)])
    report["ttft_ms"] = generation["ttft"]["median_ms"]
    report["decode_ms"] = generation["decode_per_token"]["median_ms"]
    report["stages_ms"] = {k: round(v.median_ms, 4) for k, v in path.stage_timings(30).items()}
    report["prefill_top_kernels"] = profile_top(lambda: path.prefill(**path.prefill_inputs))
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    position = torch.from_numpy(path.last_position + 1).cuda()
    report["decode_top_kernels"] = profile_top(lambda: path.decode(0, token=token, position=position))
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if "kernels" not in k}, indent=1))


if __name__ == "__main__":
    main()
